"""Attention over the paged KV cache, behind one small Protocol.

``TorchPagedAttention`` is the CPU path and the reference: it scatters new K/V into the cache by
slot, gathers each sequence's context through its block table and runs PyTorch's SDPA with a
causal mask. ``TritonPagedAttention`` calls ``kvstack.kernels`` (cache write, paged attention)
on CUDA, or on CPU under ``TRITON_INTERPRET=1`` where tests check it against the PyTorch path;
it is imported only when chosen.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from kvstack.serve._env import triton_interpreter
from kvstack.serve.errors import ConfigError

__all__ = [
    "AttentionBackend",
    "BatchLayout",
    "PagedKVCache",
    "TorchPagedAttention",
    "TritonPagedAttention",
    "make_attention_backend",
]


@dataclass(slots=True)
class PagedKVCache:
    """Per-layer K and V pages, each ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    Block-major: all of block ``b`` (every layer's K then V page) is one contiguous run of
    ``block_nbytes`` bytes at ``b * block_nbytes`` in ``blocks`` (``[num_blocks, block_nbytes]``
    uint8). A KV handoff or a store read then moves one range per block, not one per layer
    (the per-layer views have a free block stride, which both attention backends accept).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    block_size: int
    blocks: torch.Tensor

    @property
    def num_blocks(self) -> int:
        """Blocks in the cache."""
        return self.blocks.shape[0]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block across all layers, K and V."""
        return self.blocks.shape[1]

    @classmethod
    def allocate(
        cls,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        memory: torch.Tensor | None = None,
    ) -> PagedKVCache:
        """Zeroed pages for every layer, in ``memory`` (flat uint8: a shared segment) or new."""
        nbytes = num_blocks * cls.bytes_per_block(
            num_layers=num_layers,
            block_size=block_size,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=dtype,
        )
        if memory is None:
            memory = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        elif (
            memory.dtype != torch.uint8
            or memory.numel() < nbytes
            or memory.device.type != device.type
            or (device.index is not None and memory.device.index != device.index)
        ):
            raise ConfigError(
                "kv_memory",
                f"{memory.numel()} {memory.dtype} on {memory.device}",
                f"must be at least {nbytes} uint8 on {device}",
            )
        else:
            memory = memory[:nbytes]
            memory.zero_()
        # [num_blocks, layers, K/V, block_size, kv_heads, head_dim]
        typed = memory.view(dtype).view(
            num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim
        )
        return cls(
            keys=[typed[:, layer, 0] for layer in range(num_layers)],
            values=[typed[:, layer, 1] for layer in range(num_layers)],
            block_size=block_size,
            blocks=memory.view(num_blocks, -1),
        )

    @staticmethod
    def bytes_per_block(
        *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Size of one block across all layers, K and V."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


@dataclass(frozen=True, slots=True)
class BatchLayout:
    """One step's flattened batch: sequence s owns query rows ``query_start[s]:query_start[s+1]``.

    ``seq_lens[s]`` counts the sequence's tokens including its new ones; ``block_tables[s]`` its
    blocks in order; ``slot_mapping`` is ``[num_tokens]`` int64, ``block * block_size + offset``.
    """

    query_start: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    slot_mapping: torch.Tensor


class AttentionBackend(Protocol):
    """Writes a step's new K/V into the paged cache and attends over each sequence's context."""

    name: str

    def begin(self, layout: BatchLayout) -> None:
        """Prepare per-step indices once, before the layers run."""
        ...

    def __call__(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """``query [T, heads, dim]``, ``key``/``value [T, kv_heads, dim]`` → ``[T, heads, dim]``."""
        ...


@dataclass(frozen=True, slots=True)
class _Group:
    """Sequences padded together: decodes (one query row each) or prefill chunks."""

    rows: torch.Tensor  # [S, max_q] query row of each padded slot (0 where padding)
    row_valid: torch.Tensor  # [S, max_q] bool
    blocks: torch.Tensor  # [S, max_ctx] block of each context position (0 where padding)
    offsets: torch.Tensor  # [S, max_ctx] its offset in the block
    mask: torch.Tensor  # [S, 1, max_q, max_ctx] bool, True = attend


class TorchPagedAttention:
    """PyTorch paged attention; pads decodes and prefill chunks into two batched SDPA calls."""

    name = "torch"

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self._groups: list[_Group] = []
        empty = torch.empty(0, dtype=torch.long)
        self._write_at = (empty, empty)

    def begin(self, layout: BatchLayout) -> None:
        device = self.cache.keys[0].device
        bs = self.cache.block_size
        slot_mapping = layout.slot_mapping.to(device)
        self._write_at = (slot_mapping // bs, slot_mapping % bs)
        decodes: list[int] = []
        prefills: list[int] = []
        for s in range(len(layout.seq_lens)):
            q_len = layout.query_start[s + 1] - layout.query_start[s]
            (decodes if q_len == 1 else prefills).append(s)
        self._groups = []
        for seqs in (decodes, prefills):
            if not seqs:
                continue
            q_lens = [layout.query_start[s + 1] - layout.query_start[s] for s in seqs]
            ctx = [layout.seq_lens[s] for s in seqs]
            max_q, max_ctx = max(q_lens), max(ctx)
            max_blocks = -(-max_ctx // bs)
            tables = torch.zeros(len(seqs), max_blocks, dtype=torch.long)
            rows = torch.zeros(len(seqs), max_q, dtype=torch.long)
            for i, s in enumerate(seqs):
                table = layout.block_tables[s][:max_blocks]
                tables[i, : len(table)] = torch.tensor(table, dtype=torch.long)
                rows[i, : q_lens[i]] = torch.arange(
                    layout.query_start[s], layout.query_start[s + 1]
                )
            positions = torch.arange(max_ctx)
            blocks = tables[:, positions // bs]  # [S, max_ctx]
            q_len_t = torch.tensor(q_lens)[:, None]
            ctx_t = torch.tensor(ctx)[:, None]
            row_valid = torch.arange(max_q)[None, :] < q_len_t
            # absolute position of each query row; padding rows copy the last real one
            q_pos = ctx_t - q_len_t + torch.minimum(torch.arange(max_q)[None, :], q_len_t - 1)
            mask = (positions[None, None, :] <= q_pos[:, :, None]) & (
                positions[None, None, :] < ctx_t[:, :, None]
            )
            self._groups.append(
                _Group(
                    rows=rows.to(device),
                    row_valid=row_valid.to(device),
                    blocks=blocks.to(device),
                    offsets=(positions % bs).expand_as(blocks).to(device),
                    mask=mask[:, None].to(device),
                )
            )

    def __call__(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        k_pages, v_pages = self.cache.keys[layer], self.cache.values[layer]
        # Pages of one layer are not adjacent (block-major cache): index (block, offset) pairs.
        blocks, offsets = self._write_at
        k_pages[blocks, offsets] = key
        v_pages[blocks, offsets] = value
        out = torch.empty_like(query)
        for g in self._groups:
            q = query[g.rows].transpose(1, 2)  # [S, heads, max_q, dim]
            k = k_pages[g.blocks, g.offsets].transpose(1, 2)  # [S, kv_heads, max_ctx, dim]
            v = v_pages[g.blocks, g.offsets].transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, enable_gqa=True)
            out[g.rows[g.row_valid]] = o.transpose(1, 2)[g.row_valid]
        return out


class TritonPagedAttention:
    """``kvstack.kernels`` cache write and paged attention; CUDA (or the Triton interpreter)."""

    name = "triton"

    def __init__(self, cache: PagedKVCache) -> None:
        # Imported here: kvstack.kernels imports Triton, which a CPU-only install may lack.
        from kvstack.kernels import paged_attention, write_kv_cache  # noqa: PLC0415

        self._paged_attention = paged_attention
        self._write_kv_cache = write_kv_cache
        self.cache = cache
        self._tensors: dict[str, torch.Tensor] = {}
        self._max_query_len = 0
        self._max_seq_len = 0

    def begin(self, layout: BatchLayout) -> None:
        device = self.cache.keys[0].device
        max_blocks = max(len(t) for t in layout.block_tables)
        table = torch.zeros(len(layout.block_tables), max_blocks, dtype=torch.int32)
        for s, blocks in enumerate(layout.block_tables):
            table[s, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self._tensors = {
            "block_table": table.to(device),
            "seq_lens": torch.tensor(layout.seq_lens, dtype=torch.int32, device=device),
            "query_start": torch.tensor(layout.query_start, dtype=torch.int32, device=device),
            "slot_mapping": layout.slot_mapping.to(device),
        }
        starts = layout.query_start
        self._max_query_len = max(b - a for a, b in itertools.pairwise(starts))
        self._max_seq_len = max(layout.seq_lens)

    def __call__(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        k_pages, v_pages = self.cache.keys[layer], self.cache.values[layer]
        self._write_kv_cache(key, value, k_pages, v_pages, self._tensors["slot_mapping"])
        return self._paged_attention(
            query,
            k_pages,
            v_pages,
            block_table=self._tensors["block_table"],
            seq_lens=self._tensors["seq_lens"],
            query_start=self._tensors["query_start"],
            max_query_len=self._max_query_len,
            max_seq_len=self._max_seq_len,
        )


def make_attention_backend(name: str, cache: PagedKVCache) -> AttentionBackend:
    """``"auto"`` picks Triton on CUDA and PyTorch elsewhere; ``"torch"``/``"triton"`` force one."""
    device = cache.keys[0].device
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchPagedAttention(cache)
    if name == "triton":
        if device.type != "cuda" and not triton_interpreter():
            raise ConfigError(
                "attention_backend",
                name,
                f"needs a CUDA device (or TRITON_INTERPRET=1), not {device}",
            )
        try:
            return TritonPagedAttention(cache)
        except ImportError as exc:
            raise ConfigError(
                "attention_backend", name, f"needs kvstack.kernels with Triton: {exc}"
            ) from exc
    raise ConfigError("attention_backend", name, "must be auto, torch or triton")
