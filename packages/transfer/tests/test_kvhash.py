"""KVH-64: the native digest (plain, inside copies, split over threads) against the numpy
reference on random inputs, pinned values, what it detects, and the public functions."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from kvstack.transfer import (
    InvalidRequest,
    _env,
    _native,
    bytes_hashed,
    copy_host_hashed,
    copy_host_many_hashed,
    kvhash64,
    kvhash64_many,
    native_hashing,
)
from kvstack.transfer._kvhash import BLOCK, kvhash64_reference
from kvstack.transfer._native import NativeCopier

from .test_native import LAYOUT_IDS, LAYOUTS, THREADS, _layout, _reference

KiB = 1 << 10
MiB = 1 << 20
# Lengths around the loops' strides (64 and 128 bytes), words, and blocks.
EDGE_LENGTHS = [0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 4096, BLOCK - 1, BLOCK, BLOCK + 1]


@pytest.fixture(scope="module")
def copier(tmp_path_factory: pytest.TempPathFactory) -> NativeCopier:
    """A fresh build of the source under test in a private cache."""
    for cc in _env.compilers():
        if shutil.which(cc.split()[0]):
            return _native.build(cache_dir=str(tmp_path_factory.mktemp("cache")), compiler=cc)
    pytest.skip(f"no C compiler ({', '.join(_env.compilers())})")


@pytest.fixture
def native_off(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(_env.NATIVE_COPY_VAR, "0")
    _native.forget()
    try:
        yield
    finally:
        monkeypatch.undo()
        _native.forget()


def test_pinned_values() -> None:
    # Stored checksums depend on these: a change to the function must be a new kind.
    assert kvhash64_reference(b"") == 0x6583FF37883E4CA9
    assert kvhash64_reference(b"kvstack") == 0x5657F10192D53AC3
    assert kvhash64_reference(bytes(range(256)) * 1000) == 0x1127B704320EE6DD
    assert kvhash64(bytes(range(256)) * 1000) == 0x1127B704320EE6DD


@pytest.mark.parametrize("length", EDGE_LENGTHS)
@pytest.mark.parametrize("misalign", [0, 3])
def test_edge_lengths_match_the_reference(copier: NativeCopier, length: int, misalign: int) -> None:
    rng = np.random.default_rng(length * 7 + misalign)
    src = rng.integers(0, 256, length + 16, dtype=np.uint8)[misalign : misalign + length]
    dst = np.zeros(length + 16, dtype=np.uint8)[misalign : misalign + length]
    expected = kvhash64_reference(src)
    assert copier.hash_copy(0, src.ctypes.data, length, threads=1, stream=False) == expected
    for stream in (False, True):
        dst[:] = 0
        got = copier.hash_copy(dst.ctypes.data, src.ctypes.data, length, threads=1, stream=stream)
        assert got == expected
        np.testing.assert_array_equal(dst, src)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize(("seed", "count", "top", "run"), LAYOUTS, ids=LAYOUT_IDS)
def test_hash_ranges_match_the_reference(
    copier: NativeCopier, *, seed: int, count: int, top: int, run: float, threads: int
) -> None:
    dsts, srcs, lengths, dst_bytes, src_bytes = _layout(seed, count, top, run)
    rng = np.random.default_rng(seed + 3000)
    src = rng.integers(0, 256, src_bytes, dtype=np.uint8)
    dst = rng.integers(0, 256, dst_bytes, dtype=np.uint8)  # poison: untouched bytes must stay
    expected = [kvhash64_reference(src[s : s + n]) for s, n in zip(srcs, lengths, strict=True)]
    only = copier.hash_ranges(None, srcs + src.ctypes.data, lengths, threads=threads)
    assert only.tolist() == expected
    copied = _reference(dst, src, dsts, srcs, lengths)
    digests = copier.hash_ranges(
        dsts + dst.ctypes.data, srcs + src.ctypes.data, lengths, threads=threads, stream=True
    )
    assert digests.tolist() == expected
    np.testing.assert_array_equal(dst, copied)


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_one_big_range_split_over_threads(copier: NativeCopier, threads: int) -> None:
    src = np.random.default_rng(threads).integers(0, 256, 3 * MiB + 5, dtype=np.uint8)
    dst = np.empty_like(src)
    got = copier.hash_copy(
        dst.ctypes.data, src.ctypes.data, src.nbytes, threads=threads, stream=True
    )
    assert got == kvhash64_reference(src)
    np.testing.assert_array_equal(dst, src)


def test_many_callers_at_once(copier: NativeCopier) -> None:
    # One caller owns the helper pool; the others hash on their own thread. All must be right.
    rng = np.random.default_rng(9)
    sources = [rng.integers(0, 256, 2 * MiB + i, dtype=np.uint8) for i in range(6)]
    expected = [kvhash64_reference(s) for s in sources]
    errors: list[str] = []

    def caller(k: int) -> None:
        for _ in range(10):
            out = np.empty_like(sources[k])
            got = copier.hash_copy(
                out.ctypes.data, sources[k].ctypes.data, out.nbytes, threads=4, stream=False
            )
            if got != expected[k] or not np.array_equal(out, sources[k]):
                errors.append(f"caller {k}: digest {got:#x}, expected {expected[k]:#x}")

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(len(sources))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors


def _changed(data: np.ndarray) -> list[np.ndarray]:
    """Corruptions a store should catch: flipped bits, moved words and blocks, a zeroed page,
    a stale block, bytes cut off or zeros added at the end."""
    rng = np.random.default_rng(4)
    out = []
    for position in [0, 7, 8, BLOCK - 1, BLOCK, data.size - 1, *rng.integers(0, data.size, 20)]:
        flipped = data.copy()
        flipped[position] ^= 1 << int(rng.integers(0, 8))
        out.append(flipped)
    words = data.copy()
    w = words[: (data.size // 8) * 8].view("<u8")
    w[[3, 900]] = w[[900, 3]]
    out.append(words)
    blocks = data.copy()
    blocks[:BLOCK], blocks[BLOCK : 2 * BLOCK] = data[BLOCK : 2 * BLOCK], data[:BLOCK]
    out.append(blocks)
    zeroed = data.copy()
    zeroed[8192:12288] = 0
    out.append(zeroed)
    stale = data.copy()
    stale[2 * BLOCK : 3 * BLOCK] = data[:BLOCK]
    out.append(stale)
    out.append(data[:-1])
    out.append(np.concatenate([data, np.zeros(3, dtype=np.uint8)]))
    return out


def test_corruptions_change_the_digest() -> None:
    data = np.random.default_rng(2).integers(0, 256, 4 * BLOCK + 13, dtype=np.uint8)
    original = kvhash64(data)
    for k, changed in enumerate(_changed(data)):
        assert kvhash64(changed) != original, k
        assert kvhash64_reference(changed) == kvhash64(changed), k


def test_public_functions_agree() -> None:
    rng = np.random.default_rng(3)
    values = [rng.integers(0, 256, n, dtype=np.uint8) for n in (0, 1, 4096, MiB + 1, 5 * MiB)]
    expected = [kvhash64_reference(v) for v in values]
    assert [kvhash64(v) for v in values] == expected
    assert [kvhash64(v.tobytes()) for v in values] == expected
    assert [kvhash64(memoryview(v.tobytes())) for v in values] == expected
    assert kvhash64_many(values) == expected
    floats = rng.random(1000).astype(np.float32)  # any dtype: its bytes are hashed
    assert kvhash64(floats) == kvhash64_reference(floats.tobytes())
    outs = [np.empty_like(v) for v in values]
    assert [
        copy_host_hashed(o, v, stream=True) for o, v in zip(outs, values, strict=True)
    ] == expected
    outs = [np.zeros_like(v) for v in values]
    assert copy_host_many_hashed(outs, values) == expected
    for out, value in zip(outs, values, strict=True):
        np.testing.assert_array_equal(out, value)


@pytest.mark.parametrize("length", [0, 1, 4096, BLOCK + 7, 3 * MiB + 1])
def test_bytes_hashed_returns_a_copy_and_its_digest(length: int) -> None:
    src = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8)
    expected = src.tobytes()
    data, digest = bytes_hashed(src)
    assert type(data) is bytes
    assert data == expected
    assert digest == kvhash64_reference(src)
    src ^= 0xFF  # a copy, not a view
    assert data == expected


def test_bad_input_is_refused_clearly() -> None:
    matrix = np.zeros((64, 64), dtype=np.uint8)
    with pytest.raises(InvalidRequest, match="C-contiguous"):
        kvhash64(matrix[:, ::2])
    with pytest.raises(InvalidRequest, match="C-contiguous"):
        bytes_hashed(matrix[:, ::2])
    with pytest.raises(InvalidRequest, match="KVH-64 of a int"):
        kvhash64(5)
    with pytest.raises(InvalidRequest, match="copy of 10 bytes into 9"):
        copy_host_hashed(np.zeros(9, dtype=np.uint8), np.zeros(10, dtype=np.uint8))
    with pytest.raises(InvalidRequest, match="2 sources for 1 destinations"):
        copy_host_many_hashed([np.zeros(1, dtype=np.uint8)], [np.zeros(1, dtype=np.uint8)] * 2)
    readonly = np.zeros(4, dtype=np.uint8)
    readonly.flags.writeable = False
    with pytest.raises(InvalidRequest, match="writable destination"):
        copy_host_hashed(readonly, np.zeros(4, dtype=np.uint8))


@pytest.mark.usefixtures("native_off")
def test_without_native_code_the_digests_are_the_same() -> None:
    assert not native_hashing()
    rng = np.random.default_rng(8)
    values = [rng.integers(0, 256, n, dtype=np.uint8) for n in (0, 13, BLOCK + 5, 2 * MiB)]
    expected = [kvhash64_reference(v) for v in values]
    assert [kvhash64(v) for v in values] == expected
    assert kvhash64_many(values) == expected
    outs = [np.zeros_like(v) for v in values]
    assert copy_host_many_hashed(outs, values) == expected
    assert copy_host_hashed(outs[3], values[3]) == expected[3]
    assert bytes_hashed(values[2]) == (values[2].tobytes(), expected[2])
    for out, value in zip(outs, values, strict=True):
        np.testing.assert_array_equal(out, value)
