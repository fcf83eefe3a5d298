"""The native library (_copy.c): range copies against a numpy reference, socket I/O over real
socket pairs, and the build (cache, concurrent builders, failures, forced fallback)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvstack.transfer import _env, _memory, _native
from kvstack.transfer._framing import FrameOp, pack
from kvstack.transfer._native import NativeCopier, NativeUnavailable

KiB = 1 << 10
MiB = 1 << 20
TIMEOUT_S = 60.0
# Random layouts: (seed, ranges, largest range in bytes, chance a range continues the previous
# one on both sides). 1 and 4097 are odd on purpose; 0 ranges must be a no-op; 2 MiB ranges
# are cut across several threads' chunks.
LAYOUTS = [
    (0, 0, 1, 0.0),
    (1, 1, 1, 0.0),  # one byte
    (2, 300, 64, 0.2),  # tiny ranges, many zero-length
    (3, 256, 16 * KiB, 0.0),  # a KV handoff's scattered pages
    (4, 256, 16 * KiB, 0.7),  # runs that coalesce
    (5, 200, 4097, 0.3),
    (6, 5, 2 * MiB, 0.3),  # few big ranges: split inside a range across threads
    (7, 1024, 64 * KiB, 0.1),  # 32 MiB in all: many chunks on every thread
]
LAYOUT_IDS = [f"seed{seed}-n{n}-max{top}-run{run}" for seed, n, top, run in LAYOUTS]
# 3 and 8 threads: more than the 2 cores of the CI box, and not a power of two.
THREADS = [1, 2, 3, 8]


def _compiler() -> str:
    for cc in _env.compilers():
        if shutil.which(cc.split()[0]):
            return cc
    pytest.skip(f"no C compiler ({', '.join(_env.compilers())})")


@pytest.fixture(scope="module")
def copier(tmp_path_factory: pytest.TempPathFactory) -> NativeCopier:
    """A fresh build in a private cache (not the user's): the source under test, built now."""
    return _native.build(cache_dir=str(tmp_path_factory.mktemp("cache")), compiler=_compiler())


def _layout(
    seed: int, count: int, top: int, run: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(dst offsets, src offsets, lengths, dst region bytes, src region bytes) for ``count``
    ranges: destinations never overlap and sit in shuffled order with odd gaps (unaligned);
    sources land anywhere (they may overlap); a share of ranges continue the previous one on
    both sides, so they coalesce.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, top + 1, count).astype(np.int64)
    lengths[rng.random(count) < 0.1] = 0  # empty ranges anywhere
    continues = rng.random(count) < run
    continues[:1] = False
    # Place destinations in blocks: a block is a range plus the ranges that continue it.
    blocks = np.cumsum(~continues) - 1
    block_lengths = np.bincount(blocks, weights=lengths, minlength=blocks.max() + 1 if count else 0)
    order = rng.permutation(len(block_lengths))
    gaps = rng.integers(0, 67, len(block_lengths))
    block_starts = np.zeros(len(block_lengths), dtype=np.int64)
    position = int(rng.integers(0, 64))
    for b in order.tolist():
        block_starts[b] = position
        position += int(block_lengths[b]) + int(gaps[b])
    dst_bytes = position + 64
    src_bytes = max(2 * int(lengths.sum()), 4096) + 64
    dsts = np.zeros(count, dtype=np.int64)
    srcs = np.zeros(count, dtype=np.int64)
    for i in range(count):
        if continues[i]:
            dsts[i] = dsts[i - 1] + lengths[i - 1]
            srcs[i] = srcs[i - 1] + lengths[i - 1]
            if srcs[i] + lengths[i] > src_bytes:
                srcs[i] = 0  # keep it in bounds: then it continues only locally
        else:
            dsts[i] = block_starts[blocks[i]]
            srcs[i] = int(rng.integers(0, src_bytes - int(lengths[i]) + 1))
    return dsts, srcs, lengths, dst_bytes, src_bytes


def _reference(
    dst: np.ndarray, src: np.ndarray, dsts: np.ndarray, srcs: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    expected = dst.copy()
    for d, s, n in zip(dsts.tolist(), srcs.tolist(), lengths.tolist(), strict=True):
        expected[d : d + n] = src[s : s + n]
    return expected


@pytest.mark.parametrize("stream", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize(("seed", "count", "top", "run"), LAYOUTS, ids=LAYOUT_IDS)
def test_copy_ranges_matches_numpy(
    copier: NativeCopier, *, seed: int, count: int, top: int, run: float, threads: int,
    stream: bool,
) -> None:  # fmt: skip
    dsts, srcs, lengths, dst_bytes, src_bytes = _layout(seed, count, top, run)
    rng = np.random.default_rng(seed + 1000)
    src = rng.integers(0, 256, src_bytes, dtype=np.uint8)
    dst = rng.integers(0, 256, dst_bytes, dtype=np.uint8)  # poison: untouched bytes must stay
    expected = _reference(dst, src, dsts, srcs, lengths)
    used = copier.copy_ranges(
        dsts + dst.ctypes.data, srcs + src.ctypes.data, lengths, threads=threads, stream=stream
    )
    np.testing.assert_array_equal(dst, expected)
    assert 1 <= used <= threads


def test_big_copies_are_shared_with_helper_threads(copier: NativeCopier) -> None:
    # 16 MiB in 4 KiB pieces: a parked helper that never joined would leave every copy to the
    # calling thread (still correct, never faster). It wakes in microseconds; 20 copies give it
    # 20 chances.
    src = np.random.default_rng(3).integers(0, 256, 16 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)
    offsets = np.arange(0, 16 * MiB, 4 * KiB, dtype=np.int64)
    lengths = np.full(len(offsets), 4 * KiB, dtype=np.int64)
    shuffled = np.random.default_rng(4).permutation(offsets)
    used = [
        copier.copy_ranges(
            shuffled + dst.ctypes.data, offsets + src.ctypes.data, lengths, threads=4
        )
        for _ in range(20)
    ]
    pages = 4 * KiB
    np.testing.assert_array_equal(dst.reshape(-1, pages)[shuffled // pages], src.reshape(-1, pages))
    assert max(used) > 1, used


def test_copies_from_many_threads_at_once(copier: NativeCopier) -> None:
    # One call owns the helpers; the others copy alone. Every result must be whole.
    rng = np.random.default_rng(5)
    jobs = []
    for seed in range(6):
        dsts, srcs, lengths, dst_bytes, src_bytes = _layout(seed + 40, 256, 16 * KiB, 0.2)
        src = rng.integers(0, 256, src_bytes, dtype=np.uint8)
        dst = rng.integers(0, 256, dst_bytes, dtype=np.uint8)
        jobs.append((dst, src, dsts, srcs, lengths, _reference(dst, src, dsts, srcs, lengths)))
    errors: list[BaseException] = []

    def run(job: tuple[np.ndarray, ...]) -> None:
        dst, src, dsts, srcs, lengths, _ = job
        try:
            for _ in range(20):
                copier.copy_ranges(
                    dsts + dst.ctypes.data, srcs + src.ctypes.data, lengths, threads=4
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not errors
    assert not any(t.is_alive() for t in threads)
    for dst, _, _, _, _, expected in jobs:
        np.testing.assert_array_equal(dst, expected)


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_big_copies_where_helpers_poll_leave_the_caller_waiting(
    copier: NativeCopier, threads: int
) -> None:
    # With helpers polling (hosts with cores to spare), a copy of 8 MiB or more is left to
    # one more helper while the caller waits: bytes exact, alone and with other callers at
    # once (one owns the pool, the others copy alone).
    copier.set_helper_spin(0.005)
    try:
        rng = np.random.default_rng(12 + threads)
        size = 12 * MiB
        offsets = np.arange(0, size, 64 * KiB, dtype=np.int64)
        lengths = np.full(len(offsets), 64 * KiB, dtype=np.int64)
        jobs = [
            (rng.integers(0, 256, size, dtype=np.uint8), np.zeros(size, dtype=np.uint8),
             rng.permutation(offsets))
            for _ in range(4)
        ]  # fmt: skip
        used: list[int] = []

        def run(job: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
            src, dst, order = job
            dsts, srcs = order + dst.ctypes.data, offsets + src.ctypes.data
            for _ in range(5):
                used.append(copier.copy_ranges(dsts, srcs, lengths, threads=threads))

        run(jobs[0])
        workers = [threading.Thread(target=run, args=(job,)) for job in jobs[1:]]
        for t in workers:
            t.start()
        for t in workers:
            t.join(TIMEOUT_S)
        assert not any(t.is_alive() for t in workers)
        assert all(1 <= u <= threads for u in used), used
        for src, dst, order in jobs:
            np.testing.assert_array_equal(
                dst.reshape(-1, 64 * KiB)[order // (64 * KiB)], src.reshape(-1, 64 * KiB)
            )
    finally:
        copier.set_helper_spin(0.0)


def test_helpers_join_and_leave_back_to_back_jobs_from_many_callers(copier: NativeCopier) -> None:
    # Helpers join and leave jobs without the pool's lock. Hundreds of short jobs back to back
    # from four threads, helpers polling between them, thread counts mixed: every copy whole,
    # no job left waiting for a helper that never comes.
    copier.set_helper_spin(0.002)
    try:
        rng = np.random.default_rng(13)
        size = 1 * MiB
        offsets = np.arange(0, size, 16 * KiB, dtype=np.int64)
        lengths = np.full(len(offsets), 16 * KiB, dtype=np.int64)
        errors: list[BaseException] = []

        def run(seed: int) -> None:
            local = np.random.default_rng(seed)
            src = local.integers(0, 256, size, dtype=np.uint8)
            try:
                for i in range(150):
                    dst = np.zeros_like(src)
                    order = local.permutation(offsets)
                    dsts, srcs = order + dst.ctypes.data, offsets + src.ctypes.data
                    used = copier.copy_ranges(dsts, srcs, lengths, threads=[2, 8, 3, 5][i % 4])
                    assert 1 <= used <= 8
                    np.testing.assert_array_equal(
                        dst.reshape(-1, 16 * KiB)[order // (16 * KiB)],
                        src.reshape(-1, 16 * KiB),
                    )
            except BaseException as exc:
                errors.append(exc)

        callers = [
            threading.Thread(target=run, args=(int(rng.integers(1 << 30)),)) for _ in range(4)
        ]
        for t in callers:
            t.start()
        for t in callers:
            t.join(TIMEOUT_S)
        assert not any(t.is_alive() for t in callers)
        assert not errors, errors[0]
    finally:
        copier.set_helper_spin(0.0)


def _helper_cpu_ticks() -> int:
    """CPU ticks (user + system) of the native copier's helper threads (named kvstack-copy)."""
    ticks = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                if f.read().strip() != "kvstack-copy":
                    continue
            with open(f"/proc/self/task/{task}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that just ended
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_polling_helpers_join_only_jobs_that_want_them_then_park(copier: NativeCopier) -> None:
    # Helpers poll 5 ms for the next job after one. A job wanting fewer threads than are
    # polling must not be joined by the extra ones; every copy stays byte-exact; once copies
    # stop, the helpers park (they do not keep spinning).
    copier.set_helper_spin(0.005)
    try:
        rng = np.random.default_rng(11)
        src = rng.integers(0, 256, 2 * MiB, dtype=np.uint8)
        offsets = np.arange(0, 2 * MiB, 16 * KiB, dtype=np.int64)
        lengths = np.full(len(offsets), 16 * KiB, dtype=np.int64)
        wanted = [8, 2, 8, 1, 4, 8, 3, 8, 2] * 10
        dsts = [np.zeros_like(src) for _ in wanted]
        orders = [rng.permutation(offsets) for _ in wanted]
        used = [  # back to back: the helpers of each job are still polling for the next
            copier.copy_ranges(
                order + dst.ctypes.data, offsets + src.ctypes.data, lengths, threads=threads
            )
            for dst, order, threads in zip(dsts, orders, wanted, strict=True)
        ]
        pairs = list(zip(wanted, used, strict=True))
        assert all(1 <= u <= w for w, u in pairs), pairs
        for dst, order in zip(dsts, orders, strict=True):
            np.testing.assert_array_equal(
                dst.reshape(-1, 16 * KiB)[order // (16 * KiB)], src.reshape(-1, 16 * KiB)
            )
        names = []
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(FileNotFoundError), open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        assert "kvstack-copy" in names  # the helpers are found by name
        time.sleep(0.05)  # past the polling
        before = _helper_cpu_ticks()
        time.sleep(0.5)
        spent = _helper_cpu_ticks() - before
        # One helper polling throughout would take ~50 ticks (100 a second).
        assert spent < 15, f"helpers took {spent} ticks of CPU while idle"
    finally:
        copier.set_helper_spin(0.0)


@pytest.mark.parametrize("reading", [False, True], ids=["write", "read"])
@pytest.mark.parametrize("scalar_length", [False, True], ids=["lengths", "one-length"])
@pytest.mark.parametrize("threads", [1, 3])
def test_copy_pages_checks_then_copies(
    copier: NativeCopier, *, reading: bool, scalar_length: bool, threads: int
) -> None:
    rng = np.random.default_rng(20 + threads)
    local = rng.integers(0, 256, 2 * MiB, dtype=np.uint8)
    remote = rng.integers(0, 256, 3 * MiB, dtype=np.uint8)
    count, slot = 96, 16 * KiB
    local_offsets = rng.choice(local.size // slot, count, replace=False) * slot + 3
    remote_offsets = rng.choice(remote.size // slot, count, replace=False) * slot + 5
    lengths: np.ndarray | int = 4097 if scalar_length else rng.integers(0, slot - 8, count)
    each = np.broadcast_to(np.asarray(lengths, dtype=np.int64), (count,))
    if reading:
        expected_local = _reference(local, remote, local_offsets, remote_offsets, each)
        expected_remote = remote.copy()
    else:
        expected_local = local.copy()
        expected_remote = _reference(remote, local, remote_offsets, local_offsets, each)
    table = np.zeros((3, count), dtype=np.int64)
    copied = copier.copy_pages(
        local_offsets,
        remote_offsets,
        lengths,
        table=table,
        local=(local.ctypes.data, local.size),
        remote=(remote.ctypes.data, remote.size),
        reading=reading,
        threads=threads,
        bytes_per_thread=64 * KiB,
    )
    assert copied == int(each.sum())
    np.testing.assert_array_equal(local, expected_local)
    np.testing.assert_array_equal(remote, expected_remote)
    np.testing.assert_array_equal(table, np.stack([local_offsets, remote_offsets, each]))


@pytest.mark.parametrize(
    ("column", "index", "value"),
    [
        ("local", 5, -1),
        ("remote", 0, -3),
        ("lengths", 9, -1),
        ("local", 7, 1 * MiB - 99),  # ends 1 byte past the local segment
        ("remote", 63, 2 * MiB - 99),  # ... the remote one
        ("lengths", 2, 2**62),  # offset + length would overflow a naive check
    ],
)
def test_copy_pages_names_the_first_bad_request_and_copies_nothing(
    copier: NativeCopier, column: str, index: int, value: int
) -> None:
    rng = np.random.default_rng(30)
    local = rng.integers(0, 256, 1 * MiB, dtype=np.uint8)
    remote = rng.integers(0, 256, 2 * MiB, dtype=np.uint8)
    columns = {
        "local": np.arange(64, dtype=np.int64) * 1024,
        "remote": np.arange(64, dtype=np.int64) * 2048,
        "lengths": np.full(64, 100, dtype=np.int64),
    }
    columns[column][index] = value
    columns[column][index + 1 :] = -1  # a later bad request must not be the one named
    before_local, before_remote = local.copy(), remote.copy()
    copied = copier.copy_pages(
        columns["local"],
        columns["remote"],
        columns["lengths"],
        table=None,
        local=(local.ctypes.data, local.size),
        remote=(remote.ctypes.data, remote.size),
        reading=False,
        threads=2,
        bytes_per_thread=1024,
    )
    assert copied == -1 - index
    np.testing.assert_array_equal(local, before_local)
    np.testing.assert_array_equal(remote, before_remote)


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("owner", ["live", "exited", "replaced", "removed"])
def test_copy_route_copies_and_checks_the_owner_meanwhile(
    copier: NativeCopier, tmp_path: Path, *, threads: int, owner: str
) -> None:
    # A remembered shm route copies like copy_pages and checks the remote owner (its pid, and
    # the inode of its file) on the way: an exited owner or a replaced or removed file gives
    # ROUTE_STALE, after the bytes went through the old mapping; a bad request copies nothing.
    rng = np.random.default_rng(40 + threads)
    local = rng.integers(0, 256, 2 * MiB, dtype=np.uint8)
    remote = rng.integers(0, 256, 2 * MiB, dtype=np.uint8)
    path = tmp_path / "owner-file"
    path.write_bytes(b"x")
    inode = path.stat().st_ino
    pid = os.getpid()
    if owner == "exited":
        child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                               capture_output=True, text=True, check=True)  # fmt: skip
        pid = int(child.stdout)
    elif owner == "replaced":
        path.unlink()
        (tmp_path / "other").write_bytes(b"y")  # keeps the old inode number from coming back
        path.write_bytes(b"z")
    elif owner == "removed":
        path.unlink()
    fields = np.array(
        [local.ctypes.data, local.size, remote.ctypes.data, remote.size, 0, threads, 64 * KiB,
         pid, inode],
        dtype=np.int64,
    )  # fmt: skip
    assert len(fields) == _native.ROUTE_FIELDS
    count, slot = 128, 16 * KiB
    local_offsets = rng.choice(local.size // slot, count, replace=False) * slot
    remote_offsets = rng.choice(remote.size // slot, count, replace=False) * slot
    expected = _reference(remote, local, remote_offsets, local_offsets, np.full(count, slot))
    copied = copier.copy_route(
        fields.ctypes.data, os.fsencode(path), local_offsets, remote_offsets, slot
    )
    assert copied == (count * slot if owner == "live" else _native.ROUTE_STALE)
    np.testing.assert_array_equal(remote, expected)  # copied either way
    remote_offsets[7] = remote.size - slot + 1  # one byte past the end
    before = remote.copy()
    copied = copier.copy_route(
        fields.ctypes.data, os.fsencode(path), local_offsets, remote_offsets, slot
    )
    assert copied == -1 - 7
    np.testing.assert_array_equal(remote, before)


@pytest.mark.parametrize(
    "bad",
    ["int32-column", "strided-column", "short-column", "short-table", "int32-table"],
)
def test_copy_pages_refuses_columns_it_cannot_read(copier: NativeCopier, bad: str) -> None:
    buffer = np.zeros(64 * KiB, dtype=np.uint8)
    offsets = np.arange(8, dtype=np.int64) * 4096
    columns = {
        "int32-column": (offsets.astype(np.int32), offsets, None),
        "strided-column": (np.repeat(offsets, 2)[::2], offsets, None),
        "short-column": (offsets[:7], offsets, None),
        "short-table": (offsets, offsets, np.zeros((3, 7), dtype=np.int64)),
        "int32-table": (offsets, offsets, np.zeros((3, 8), dtype=np.int32)),
    }
    local_offsets, remote_offsets, table = columns[bad]
    with pytest.raises(ValueError, match="contiguous int64s"):
        copier.copy_pages(
            local_offsets,
            remote_offsets,
            100,
            table=table,
            local=(buffer.ctypes.data, buffer.size),
            remote=(buffer.ctypes.data, buffer.size),
            reading=False,
            threads=1,
            bytes_per_thread=1024,
        )
    assert not buffer.any()


@pytest.mark.parametrize("scalar_length", [False, True], ids=["lengths", "one-length"])
def test_plan_pages_lays_out_a_tcp_batch(copier: NativeCopier, scalar_length: bool) -> None:
    rng = np.random.default_rng(40)
    local = np.zeros(2 * MiB, dtype=np.uint8)
    count, slot = 80, 16 * KiB
    local_offsets = rng.choice(local.size // slot, count, replace=False) * slot + 3
    remote_offsets = rng.choice(192, count, replace=False) * slot + 5
    lengths: np.ndarray | int = 4097 if scalar_length else rng.integers(0, slot - 8, count)
    each = np.broadcast_to(np.asarray(lengths, dtype=np.int64), (count,))
    planned = copier.plan_pages(
        local_offsets,
        remote_offsets,
        lengths,
        local=(local.ctypes.data, local.size),
        remote_size=3 * MiB,
        max_length=slot,
    )
    assert not isinstance(planned, int)
    table, wire, addresses, total = planned
    assert total == int(each.sum())
    np.testing.assert_array_equal(table, np.stack([local_offsets, remote_offsets, each]))
    pairs = np.frombuffer(wire, dtype="<u8").reshape(count, 2)
    np.testing.assert_array_equal(pairs, np.stack([remote_offsets, each], axis=1))
    np.testing.assert_array_equal(addresses, local_offsets + local.ctypes.data)


@pytest.mark.parametrize(
    ("column", "index", "value"),
    [
        ("local", 5, -1),
        ("remote", 0, -3),
        ("local", 7, 1 * MiB - 99),  # ends 1 byte past the local segment
        ("remote", 63, 2 * MiB - 99),  # ... the remote one
        ("lengths", 2, 2**62),  # past max_length (and an overflow for a naive check)
        ("lengths", 4, 4097),  # past max_length only
    ],
)
def test_plan_pages_names_the_first_bad_request(
    copier: NativeCopier, column: str, index: int, value: int
) -> None:
    columns = {
        "local": np.arange(64, dtype=np.int64) * 1024,
        "remote": np.arange(64, dtype=np.int64) * 2048,
        "lengths": np.full(64, 100, dtype=np.int64),
    }
    columns[column][index] = value
    columns[column][index + 1 :] = -1  # a later bad request must not be the one named
    planned = copier.plan_pages(
        columns["local"],
        columns["remote"],
        columns["lengths"],
        local=(4096, 1 * MiB),  # never dereferenced: planning reads the columns only
        remote_size=2 * MiB,
        max_length=4096,
    )
    assert planned == -1 - index


def test_check_wire_gives_addresses_or_the_first_bad_range(copier: NativeCopier) -> None:
    pairs = struct.pack("<6Q", 0, 10, 990, 10, 500, 0)
    base = 1 << 40  # never dereferenced
    checked = copier.check_wire(pairs, frame_length=20, base=base, size=1000)
    assert not isinstance(checked, int)
    np.testing.assert_array_equal(checked[0], [base, base + 990, base + 500])
    np.testing.assert_array_equal(checked[1], [10, 10, 0])
    # Past the end: the first such range is named.
    bad = struct.pack("<6Q", 0, 10, 991, 10, 2000, 0)
    assert copier.check_wire(bad, frame_length=20, base=base, size=1000) == -2 - 1
    # Offsets near 2**64 must not wrap around the bounds check.
    wrap = struct.pack("<4Q", 0, 10, 2**64 - 5, 10)
    assert copier.check_wire(wrap, frame_length=20, base=base, size=1000) == -2 - 1
    # Lengths that do not add up to the frame (too few, too many, or wrapping) are junk.
    for frame_length in (19, 21):
        assert copier.check_wire(pairs, frame_length=frame_length, base=base, size=1000) == -1
    huge = struct.pack("<4Q", 0, 2**64 - 10, 0, 30)
    assert copier.check_wire(huge, frame_length=20, base=base, size=1000) == -1
    assert not isinstance(copier.check_wire(b"", frame_length=0, base=base, size=0), int)


def test_unequal_arrays_are_refused(copier: NativeCopier) -> None:
    one = np.zeros(1, dtype=np.int64)
    with pytest.raises(ValueError, match="unequal"):
        copier.copy_ranges(one, np.zeros(2, dtype=np.int64), one, threads=1)


@pytest.fixture
def forced_fallback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(_env.NATIVE_COPY_VAR, "0")
    _native.forget()
    yield
    _native.forget()


@pytest.mark.parametrize(("seed", "count", "top", "run"), LAYOUTS, ids=LAYOUT_IDS)
def test_forced_fallback_gives_identical_bytes(
    copier: NativeCopier,
    monkeypatch: pytest.MonkeyPatch,
    *,
    seed: int,
    count: int,
    top: int,
    run: float,
) -> None:
    dsts, srcs, lengths, dst_bytes, src_bytes = _layout(seed, count, top, run)
    rng = np.random.default_rng(seed + 2000)
    src = rng.integers(0, 256, src_bytes, dtype=np.uint8)
    poison = rng.integers(0, 256, dst_bytes, dtype=np.uint8)
    native, fallback = poison.copy(), poison.copy()
    copier.copy_ranges(dsts + native.ctypes.data, srcs + src.ctypes.data, lengths, threads=3)
    monkeypatch.setenv(_env.NATIVE_COPY_VAR, "0")
    _native.forget()
    try:
        assert _native.load() is None
        _memory.memcpy_ranges(dsts + fallback.ctypes.data, srcs + src.ctypes.data, lengths)
    finally:
        _native.forget()
    np.testing.assert_array_equal(fallback, native)
    np.testing.assert_array_equal(native, _reference(poison, src, dsts, srcs, lengths))


@pytest.mark.usefixtures("forced_fallback")
def test_forced_off_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=_native.__name__):
        assert _native.load() is None
        assert _native.load() is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert _env.NATIVE_COPY_VAR in messages[0]


def test_bad_switch_value_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(_env.NATIVE_COPY_VAR, "maybe")
    _native.forget()
    try:
        with caplog.at_level(logging.WARNING, logger=_native.__name__):
            assert _native.load() is None
    finally:
        _native.forget()
    assert "'maybe'" in caplog.text
    assert _env.NATIVE_COPY_VAR in caplog.text


# -- the build ------------------------------------------------------------------------------


def test_build_once_then_reuse(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _native.build(cache_dir=str(cache), compiler=_compiler())
    built = Path(first.path)
    mtime = built.stat().st_mtime_ns
    second = _native.build(cache_dir=str(cache), compiler=_compiler())
    assert second.path == first.path
    assert built.stat().st_mtime_ns == mtime  # loaded, not rebuilt
    assert [p.name for p in cache.iterdir()] == [built.name]  # no temporary files left
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


def test_concurrent_builders_leave_one_library(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        import numpy as np
        from kvstack.transfer import _native
        copier = _native.build(cache_dir={str(cache)!r}, compiler={_compiler()!r})
        src = np.arange(100000, dtype=np.uint8)
        dst = np.zeros_like(src)
        one = lambda value: np.array([value], dtype=np.int64)
        copier.copy_ranges(one(dst.ctypes.data), one(src.ctypes.data), one(src.nbytes), threads=2)
        assert (dst == src).all()
        print(copier.path)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    paths = []
    for proc in procs:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0
        paths.append(out.strip())
    assert len(set(paths)) == 1
    assert [p.name for p in cache.iterdir()] == [Path(paths[0]).name]


def test_missing_compiler_is_named(tmp_path: Path) -> None:
    with pytest.raises(NativeUnavailable, match="kvstack-no-such-cc"):
        _native.build(cache_dir=str(tmp_path), compiler="kvstack-no-such-cc")


def test_failed_compile_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    cc = _compiler()
    with pytest.raises(NativeUnavailable, match="kvstack-bad-flag") as info:
        _native.build(cache_dir=str(tmp_path), compiler=f"{cc} --kvstack-bad-flag")
    assert "exited with" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cache_writable_by_others_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(NativeUnavailable, match="writable by other users"):
        _native.build(cache_dir=str(shared), compiler=_compiler())
    assert list(shared.iterdir()) == []


def test_fallback_when_no_compiler_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(_env.CACHE_DIR_VAR, str(tmp_path))
    monkeypatch.setenv(_env.CC_VAR, "kvstack-no-such-cc")
    _native.forget()
    try:
        with caplog.at_level(logging.WARNING, logger=_native.__name__):
            assert _native.load() is None
        # The copies still happen, the Python way.
        src = np.arange(5000, dtype=np.uint8)
        dst = np.zeros_like(src)
        _memory.memcpy_many([dst.ctypes.data], [src.ctypes.data], [src.nbytes])
        np.testing.assert_array_equal(dst, src)
    finally:
        _native.forget()
    assert "kvstack-no-such-cc" in caplog.text


def test_forked_child_copies_with_helpers(copier: NativeCopier) -> None:
    # The child of a process whose helpers exist has none (fork copies one thread): it must
    # start its own, not wait on the parent's forever.
    script = textwrap.dedent(
        f"""
        import os, sys
        import numpy as np
        from kvstack.transfer._native import NativeCopier
        copier = NativeCopier({copier.path!r})
        src = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8)
        offsets = np.arange(0, 8 << 20, 4096, dtype=np.int64)
        lengths = np.full(len(offsets), 4096, dtype=np.int64)
        def copy():
            dst = np.zeros_like(src)
            copier.copy_ranges(offsets + dst.ctypes.data, offsets + src.ctypes.data, lengths,
                               threads=4)
            return bool((dst == src).all())
        assert copy()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if copy() and copy() else 1)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0


def _python_with(env: dict[str, str], script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def test_copy_threads_follow_the_environment() -> None:
    # A big copy asks the copier for the threads the variable names (the default caps at 8).
    done = _python_with(
        {_env.COPY_THREADS_VAR: "5"},
        """
        import numpy as np
        from kvstack.transfer import _memory, _native
        asked = []
        copy_ranges = _native.NativeCopier.copy_ranges
        def spy(self, *args, threads, **kwargs):
            asked.append(threads)
            return copy_ranges(self, *args, threads=threads, **kwargs)
        _native.NativeCopier.copy_ranges = spy
        src = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8)
        dst = np.zeros_like(src)
        offsets = np.random.default_rng(1).permutation(np.arange(0, 8 << 20, 4096))
        lengths = np.full(len(offsets), 4096, dtype=np.int64)
        _memory.memcpy_ranges(offsets + dst.ctypes.data, offsets + src.ctypes.data, lengths)
        assert (dst == src).all()
        assert asked == [5], asked
        assert _memory.native_thread_policy()[0] == 5
        """,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("value", ["0", "65", "many"])
def test_bad_copy_threads_are_named(value: str) -> None:
    done = _python_with({_env.COPY_THREADS_VAR: value}, "import kvstack.transfer")
    assert done.returncode != 0
    assert "ConfigError" in done.stderr
    assert f"{_env.COPY_THREADS_VAR}={value!r}" in done.stderr


# -- socket I/O -----------------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def _tick(sock: socket.socket, seconds: float) -> None:
    # The kernel timeout set_tick uses: a blocked call returns EAGAIN after it.
    packed = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, packed)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, packed)


@pytest.mark.parametrize("buffered", [0, 1, 5000, -1], ids=["none", "1", "5000", "all"])
@pytest.mark.parametrize(("seed", "count", "top", "run"), LAYOUTS[1:7], ids=LAYOUT_IDS[1:7])
def test_send_then_recv_ranges_byte_for_byte(
    copier: NativeCopier,
    pair: tuple[socket.socket, socket.socket],
    *,
    seed: int,
    count: int,
    top: int,
    run: float,
    buffered: int,
) -> None:
    """Ranges of one array sent in order, received into ranges of another: the receiver takes
    its first ``buffered`` bytes from a buffer (what FrameReader read ahead), the rest from the
    socket. Megabytes do not fit a socket buffer, so both sides block and resume.
    """
    a, b = pair
    dsts, srcs, lengths, dst_bytes, src_bytes = _layout(seed, count, top, run)
    total = int(lengths.sum())
    rng = np.random.default_rng(seed + 3000)
    src = rng.integers(0, 256, src_bytes, dtype=np.uint8)
    dst = rng.integers(0, 256, dst_bytes, dtype=np.uint8)
    expected = _reference(dst, src, dsts, srcs, lengths)
    stream = np.concatenate(
        [src[s : s + n] for s, n in zip(srcs, lengths, strict=True)] or [src[:0]]
    )
    ahead = total if buffered < 0 else min(buffered, total)
    head = np.ascontiguousarray(stream[:ahead])
    # The sender skips what the receiver already holds, by sending from that offset on.
    sent = ctypes.c_int64(ahead)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            while not copier.send_ranges(a.fileno(), srcs + src.ctypes.data, lengths, sent):
                pass
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    got = ctypes.c_int64(0)
    _tick(b, TIMEOUT_S)
    finished = copier.recv_ranges(
        b.fileno(),
        dsts + dst.ctypes.data,
        lengths,
        got,
        buffered_address=head.ctypes.data,
        buffered_bytes=ahead,
    )
    sender.join(TIMEOUT_S)
    assert not errors
    assert finished
    assert (got.value, sent.value) == (total, total)
    np.testing.assert_array_equal(dst, expected)


def test_recv_ranges_gives_up_at_the_tick_and_resumes(
    copier: NativeCopier, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    _tick(b, 0.05)
    dst = np.zeros(10, dtype=np.uint8)
    addresses = np.array([dst.ctypes.data, dst.ctypes.data + 5], dtype=np.int64)
    lengths = np.array([5, 5], dtype=np.int64)
    done = ctypes.c_int64(0)
    a.sendall(b"abc")
    assert not copier.recv_ranges(b.fileno(), addresses, lengths, done)  # 3 bytes, then EAGAIN
    assert done.value == 3
    a.sendall(b"defghij")
    assert copier.recv_ranges(b.fileno(), addresses, lengths, done)
    assert bytes(dst) == b"abcdefghij"


def test_recv_ranges_reports_a_closed_peer(
    copier: NativeCopier, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    dst = np.zeros(100, dtype=np.uint8)
    a.sendall(b"x" * 40)
    a.close()
    done = ctypes.c_int64(0)
    one = np.array([dst.ctypes.data], dtype=np.int64)
    with pytest.raises(EOFError, match="after 40 bytes"):
        copier.recv_ranges(b.fileno(), one, np.array([100], dtype=np.int64), done)


def test_send_ranges_to_a_closed_peer_is_an_error_not_a_signal(
    copier: NativeCopier, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    b.close()
    src = np.zeros(1 << 16, dtype=np.uint8)
    one = np.array([src.ctypes.data], dtype=np.int64)
    # OSError(errno) comes back as its subclass: EPIPE or, if the kernel saw the close first,
    # ECONNRESET.
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        copier.send_ranges(
            a.fileno(), one, np.array([src.nbytes], dtype=np.int64), ctypes.c_int64(0)
        )


def test_await_replies_takes_oks_to_armed_slots_and_hands_back_the_rest(
    copier: NativeCopier, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    _tick(b, 0.05)
    slots = _native.ReplySlots(4)
    slots.ids[:3] = [7, 9, 11]
    slots.states[:3] = _native.SLOT_ARMED
    scratch = _native.Scratch(_native.REPLY_SCRATCH, 1)
    ok7, ok8 = pack(FrameOp.OK, 7), pack(FrameOp.OK, 8)
    error9 = pack(FrameOp.ERROR, 9, length=3)
    a.sendall(ok7 + ok8)  # 7 is armed: taken here; 8 is not: handed back whole
    assert copier.await_replies(b.fileno(), slots, scratch=scratch) == (_native.REPLY_PUNT)
    assert scratch.left() == ok8
    assert slots.states.tolist() == [_native.SLOT_OK, _native.SLOT_ARMED, _native.SLOT_ARMED, 0]
    a.sendall(error9)  # an error reply to an armed request is Python's to read
    assert copier.await_replies(b.fileno(), slots, scratch=scratch) == (_native.REPLY_PUNT)
    assert scratch.left() == error9
    assert slots.states[1] == _native.SLOT_ARMED
    # A slot Python failed first keeps its verdict: its late OK goes to Python.
    assert copier.finish_slot(slots, 2, _native.SLOT_FAILED)
    assert not copier.finish_slot(slots, 2, _native.SLOT_OK)
    a.sendall(pack(FrameOp.OK, 11)[:20])  # half a header, then the tick
    assert copier.await_replies(b.fileno(), slots, scratch=scratch) == (_native.REPLY_PUNT)
    assert scratch.out[0] == 20
    assert copier.await_replies(b.fileno(), slots, scratch=scratch) == (_native.REPLY_IDLE)
    a.close()
    assert copier.await_replies(b.fileno(), slots, scratch=scratch) == (_native.REPLY_EOF)


def test_wait_slot_ends_at_the_verdict_or_the_deadline(copier: NativeCopier) -> None:
    slots = _native.ReplySlots(2)
    slots.states[:] = _native.SLOT_ARMED
    started = time.monotonic()
    state = copier.wait_slot(slots, 0, deadline=started + 0.1)
    assert state == _native.SLOT_ARMED
    assert time.monotonic() - started >= 0.1
    # A verdict from another thread wakes a waiter that sleeps on the futex.
    timer = threading.Timer(0.05, copier.finish_slot, (slots, 1, _native.SLOT_FAILED))
    timer.start()
    started = time.monotonic()
    state = copier.wait_slot(slots, 1, deadline=started + TIMEOUT_S)
    timer.join()
    assert state == _native.SLOT_FAILED
    assert time.monotonic() - started < TIMEOUT_S / 2


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_env.CACHE_DIR_VAR, "/somewhere/else")
    assert _env.cache_dir() == "/somewhere/else"
    monkeypatch.delenv(_env.CACHE_DIR_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert _env.cache_dir() == os.path.join("/xdg", "kvstack")
