"""The end-to-end checksum of an object's bytes: KVH-64, or XXH3-64 where KVH-64 is slow.

The writer computes it over the bytes it put, the master keeps it with the object's metadata
(and its write-ahead log, snapshot or Redis hash), and every reader verifies the bytes it got
against it (``ClientConfig.verify_checksums``); a node computes it over a re-replicated copy.
Each record names its kind, and readers verify with that kind, so objects written with an
older kind stay readable (and stay checked) until overwritten or removed.

- KVH-64 (``kvstack.transfer.kvhash64``, protocol 3): on the H200 machines' Xeons XXH3-64
  hashed cold bytes at 7.5 GB/s per core, so a 1 MiB put spent more time hashing than copying
  and a verified batch read ran at 0.25 of the engine's copy rate. KVH-64 is split across the
  copier's threads by 64 KiB blocks and computed inside the copy of a same-host put or read.
- XXH3-64 (protocol 2): what writers use where KVH-64 has no native code (no C compiler), as
  its numpy form hashes ~5 GB/s against XXH3's 27-55.
- CRC-32 (protocol 1): records without ``checksum_kind``.
"""

from __future__ import annotations

import zlib
from enum import StrEnum

import xxhash

from kvstack.store.errors import StoreError
from kvstack.transfer import kvhash64, native_hashing

__all__ = ["DEFAULT_KIND", "ChecksumKind", "checksum", "parse_kind", "writer_kind"]


class ChecksumKind(StrEnum):
    """Which function a stored checksum value comes from (its wire and record value)."""

    KVH_64 = "kvh-64"
    XXH3_64 = "xxh3-64"
    CRC32 = "crc32"  # records written before XXH3-64; read-only from now on


# What a master's reply means when it names no kind (it omits the common one).
DEFAULT_KIND = ChecksumKind.KVH_64
# A record without "checksum_kind" predates it: its value is a CRC-32.
LEGACY_KIND = ChecksumKind.CRC32

_xxh3_64 = xxhash.xxh3_64_intdigest


def writer_kind() -> ChecksumKind:
    """The kind this process's puts commit: KVH-64 where it runs natively, else XXH3-64."""
    return ChecksumKind.KVH_64 if native_hashing() else ChecksumKind.XXH3_64


def checksum(data: memoryview | bytes | bytearray, kind: ChecksumKind) -> int:
    """The ``kind`` checksum of the contiguous bytes of ``data`` (an unsigned int)."""
    if kind is ChecksumKind.KVH_64:
        return kvhash64(data)
    if kind is ChecksumKind.XXH3_64:
        return _xxh3_64(data)
    return zlib.crc32(data)


def parse_kind(value: object, *, what: str) -> ChecksumKind:
    """``value`` as a ChecksumKind (None: the legacy CRC-32); StoreError naming ``what``."""
    if value is None:
        return LEGACY_KIND
    try:
        return ChecksumKind(str(value))
    except ValueError:
        known = ", ".join(repr(str(k)) for k in ChecksumKind)
        raise StoreError(
            f"{what} has checksum kind {value!r}, which this version does not know "
            f"(known: {known}); it was written by a newer kvstack-store"
        ) from None
