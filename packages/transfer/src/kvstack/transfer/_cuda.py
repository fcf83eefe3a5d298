"""The cuda transport: GPU memory of another process on this host, through CUDA IPC (via torch).

The owner publishes its tensor's IPC handle (``UntypedStorage._share_cuda_()``) in the segment
record; a peer opens it once (torch's ``rebuild_cuda_tensor``, which caches and ref-counts the
mapping) and then every request is one ``copy_`` on the GPU: device-to-device when the local
buffer is on a GPU, device<->host when it is host memory (torch stages pageable memory itself).
Owners on other hosts are served over tcp, which stages through host memory (see _tcp.py).
torch is imported only here and only when a CUDA segment is involved.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from kvstack.transfer._batch import Work
from kvstack.transfer._memory import copy_region, host_id, is_alive
from kvstack.transfer._transport import check_remote
from kvstack.transfer._types import Op, SegmentInfo
from kvstack.transfer.errors import PeerUnavailable, TransferError, TransportUnavailable

__all__ = ["CudaTransport", "cuda_available", "ipc_descriptor"]

logger = logging.getLogger(__name__)


def _torch() -> Any:
    # torch is optional: imported on first CUDA use only, so the engine runs without it.
    return importlib.import_module("torch")


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    return bool(_torch().cuda.is_available())


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def ipc_descriptor(flat: Any) -> dict[str, Any]:
    """The JSON-able CUDA IPC handle of a 1-D uint8 CUDA tensor (what peers need to map it)."""
    torch = _torch()

    (
        device,
        handle,
        storage_size_bytes,
        storage_offset_bytes,
        ref_counter_handle,
        ref_counter_offset,
        event_handle,
        event_sync_required,
    ) = flat.untyped_storage()._share_cuda_()
    return {
        "device_uuid": str(torch.cuda.get_device_properties(device).uuid),
        "handle": _b64(handle),
        "storage_size_bytes": int(storage_size_bytes),
        "storage_offset_bytes": int(storage_offset_bytes),
        "ref_counter_handle": _b64(ref_counter_handle),
        "ref_counter_offset": int(ref_counter_offset),
        "event_handle": _b64(event_handle),
        "event_sync_required": bool(event_sync_required),
        "tensor_offset": int(flat.storage_offset()),  # uint8 elements == bytes
        "numel": int(flat.numel()),
    }


def _local_device(uuid: str) -> int:
    torch = _torch()

    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid:
            return index
    raise TransportUnavailable(f"GPU {uuid} is not visible in this process (CUDA_VISIBLE_DEVICES?)")


def open_descriptor(desc: dict[str, Any]) -> Any:
    """Map a peer's CUDA segment into this process as a 1-D uint8 tensor."""
    torch = _torch()
    rebuild_cuda_tensor = importlib.import_module(
        "torch.multiprocessing.reductions"
    ).rebuild_cuda_tensor

    device = _local_device(str(desc["device_uuid"]))
    return rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size([int(desc["numel"])]),
        (1,),
        int(desc["tensor_offset"]),
        torch.TypedStorage,
        torch.uint8,
        device,
        _unb64(desc["handle"]),
        int(desc["storage_size_bytes"]),
        int(desc["storage_offset_bytes"]),
        False,
        _unb64(desc["ref_counter_handle"]),
        int(desc["ref_counter_offset"]),
        _unb64(desc["event_handle"]),
        bool(desc["event_sync_required"]),
    )


class CudaTransport:
    """CUDA segments of other processes on this host: one GPU copy per request."""

    name = "cuda"

    def __init__(self) -> None:
        self._host_id = host_id()
        self._available: bool | None = None
        self._tensors: dict[tuple[str, int, int], Any] = {}  # IPC handle -> mapped tensor
        self._lock = threading.Lock()

    def can_reach(self, peer: SegmentInfo) -> bool:
        if peer.cuda_ipc is None or peer.host_id != self._host_id or peer.pid == os.getpid():
            return False  # CUDA cannot open an IPC handle in the process that exported it
        if self._available is None:
            self._available = cuda_available()
        return self._available

    def _tensor(self, info: SegmentInfo) -> Any:
        desc = info.cuda_ipc
        if desc is None:
            raise TransportUnavailable(f"segment {info.name!r} is not CUDA memory", peer=info.peer)
        key = (desc["handle"], desc["storage_offset_bytes"], desc["tensor_offset"])
        tensor = self._tensors.get(key)  # a dict read needs no lock: the GIL orders it
        if tensor is not None:
            return tensor
        with self._lock:
            tensor = self._tensors.get(key)
            if tensor is None:
                try:
                    tensor = open_descriptor(desc)
                except RuntimeError as exc:  # torch reports CUDA errors as RuntimeError
                    raise PeerUnavailable(
                        f"cannot open CUDA IPC handle of {info.name!r}: {exc}", peer=info.peer
                    ) from exc
                self._tensors[key] = tensor
            return tensor

    def copy(self, info: SegmentInfo, local: Any, remote_offset: int, *, reading: bool) -> None:
        """Copy between ``local`` (a host array or CUDA tensor, already bounds-checked) and
        the bytes of ``info``'s segment from ``remote_offset`` on; the caller has checked that
        they lie inside it. Returns once the bytes are there."""
        if not is_alive(info.pid):
            raise PeerUnavailable(f"owner process {info.pid} has exited", peer=info.peer)
        tensor = self._tensor(info)
        length = local.nbytes
        # Slicing a tensor costs several us of Python: skip it for the whole segment.
        remote = (
            tensor
            if remote_offset == 0 and length == tensor.numel()
            else tensor[remote_offset : remote_offset + length]
        )
        try:
            if reading:
                copy_region(local, remote)
            else:
                copy_region(remote, local)
        except RuntimeError as exc:  # torch reports CUDA errors as RuntimeError
            raise PeerUnavailable(f"CUDA copy failed: {exc}", peer=info.peer) from exc

    def submit(self, works: Sequence[Work]) -> None:
        for work in works:
            info, r = work.remote, work.request
            try:
                check_remote(work, info.size_bytes)
                local = work.local.region(
                    r.local_offset, r.length, op=str(r.op), writing=r.op is Op.READ
                )
                self.copy(info, local, r.remote_offset, reading=r.op is Op.READ)
            except TransferError as exc:
                work.done(exc)
            else:
                work.done()

    def close(self) -> None:
        with self._lock:
            self._tensors.clear()
