"""Page pack/unpack against the reference: bit-exact gather, scatter and round trip."""

from __future__ import annotations

import pytest
import torch

from kvstack.kernels import BadDtype, BadLayout, BadShape, pack_pages, unpack_pages
from kvstack.kernels.page_pack import (
    pack_pages_reference,
    page_copy_config,
    unpack_pages_reference,
)
from kvstack.kernels.page_pack._heuristics import TILE_BYTES, TILE_WARPS, word_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (num_layers, num_blocks, num_pages): one layer and one page; a request holding many pages of
# a small cache; more layers than pages. Block ids are a shuffled sample, so pages are gathered
# out of order.
REQUESTS = [(1, 4, 1), (3, 40, 17), (5, 9, 3)]
# Page shapes after [num_layers, num_blocks]: the interleaved [2, block_size, heads, head] page;
# an odd page (3 x 5 x 7 elements, so no word wider than the element and a masked tile); a
# single-element page.
PAGES = [(2, 16, 2, 64), (3, 5, 7), (1,)]
# Bits are moved as words; float dtypes the interpreter computes wrong (bf16, fp8) included.
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int64]
SEEDS = [0, 1]


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, shape, generator=gen).to(DEVICE)
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


def _nan(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.int64:
        return torch.full(shape, -1, dtype=dtype, device=DEVICE)
    return torch.full(shape, float("nan"), device=DEVICE).to(dtype)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page", PAGES, ids=str)
@pytest.mark.parametrize(("num_layers", "num_blocks", "num_pages"), REQUESTS)
def test_pack_unpack_round_trip(
    *,
    num_layers: int,
    num_blocks: int,
    num_pages: int,
    page: tuple[int, ...],
    dtype: torch.dtype,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    kv_cache = _random((num_layers, num_blocks, *page), dtype, gen)
    block_ids = torch.randperm(num_blocks, generator=gen)[:num_pages].to(torch.int32).to(DEVICE)
    buffer = _nan((num_layers, num_pages, *page), dtype)

    packed = pack_pages(kv_cache, block_ids, out=buffer)

    assert packed is buffer
    # Bit-exact: the copy must not round or canonicalise anything.
    torch.testing.assert_close(_bits(buffer), _bits(pack_pages_reference(kv_cache, block_ids)))

    # Scatter the buffer into a poisoned cache: the named blocks come back bit-exact, all
    # others stay poisoned.
    target = _nan((num_layers, num_blocks, *page), dtype)
    expected = unpack_pages_reference(buffer, target, block_ids)
    unpack_pages(buffer, target, block_ids)
    torch.testing.assert_close(_bits(target), _bits(expected))
    torch.testing.assert_close(
        _bits(target[:, block_ids.long()]), _bits(kv_cache[:, block_ids.long()])
    )


def test_layer_major_view_of_a_block_major_cache() -> None:
    """A cache stored [num_blocks, num_layers, ...] and passed as a transposed view."""
    gen = torch.Generator().manual_seed(5)
    storage = _random((10, 4, 2, 16, 2, 64), torch.float16, gen)
    kv_cache = storage.transpose(0, 1)  # [num_layers, num_blocks, page] with swapped strides
    block_ids = torch.tensor([7, 2, 9], dtype=torch.int64, device=DEVICE)

    packed = pack_pages(kv_cache, block_ids)

    torch.testing.assert_close(packed, pack_pages_reference(kv_cache, block_ids), atol=0, rtol=0)
    assert packed.is_contiguous()


def _valid() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return {
        "buffer": _random((2, 3, 16, 8), torch.float16, gen),
        "kv_cache": _random((2, 6, 16, 8), torch.float16, gen),
        "block_ids": torch.tensor([0, 4, 5], dtype=torch.int32, device=DEVICE),
    }


@pytest.mark.parametrize(
    ("name", "bad", "error", "match"),
    [
        ("kv_cache", torch.zeros(6, 128, dtype=torch.float16), BadShape, r"kv_cache: .*\[6, 128\]"),
        ("buffer", torch.zeros(2, 4, 16, 8, dtype=torch.float16), BadShape, r"buffer: .*\[2, 4,"),
        ("buffer", torch.zeros(2, 3, 16, 8), BadDtype, "buffer: has dtype float32"),
        ("block_ids", torch.zeros(3), BadDtype, "block_ids: has dtype float32"),
        ("block_ids", torch.zeros(3, 1, dtype=torch.int32), BadShape, r"block_ids: .*\[3, 1\]"),
        (
            "kv_cache",
            torch.zeros(2, 6, 8, 16, dtype=torch.float16).transpose(2, 3),
            BadLayout,
            "kv_cache: .* must be contiguous",
        ),
        (
            "buffer",
            torch.zeros(3, 2, 16, 8, dtype=torch.float16).transpose(0, 1),
            BadLayout,
            "buffer: .* must be contiguous",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_inputs_name_the_tensor(
    name: str, bad: torch.Tensor, error: type[Exception], match: str
) -> None:
    inputs = _valid()
    inputs[name] = bad.to(DEVICE)
    with pytest.raises(error, match=match):
        unpack_pages(**inputs)


def test_word_and_tile_choice() -> None:
    # 64 KiB page, aligned strides: 8-byte words, TILE_BYTES per program.
    assert word_bytes(65536, (65536 * 64, 65536), 0) == 8
    words = TILE_BYTES // 8
    assert page_copy_config(65536 // 8, 8) == (words, 65536 // TILE_BYTES, TILE_WARPS)
    # An odd stride or offset forces narrower words.
    assert word_bytes(65536, (65536 * 64, 65538), 0) == 2
    assert word_bytes(105, (105, 105 * 9), 0) == 1
    assert word_bytes(64, (64, 128), 4) == 4
    # A tiny page is one small program.
    assert page_copy_config(3, 1) == (4, 1, 1)


@pytest.mark.gpu
def test_round_trip_llama_request_on_gpu() -> None:
    """One 4096-token request of Llama-3.1-8B, 32 layers: 512 MiB each way, bf16."""
    gen = torch.Generator(device="cuda").manual_seed(13)
    num_layers, num_blocks, num_pages = 32, 512, 256
    kv_cache = torch.randn(
        (num_layers, num_blocks, 2, 16, 8, 128), generator=gen, device="cuda"
    ).to(torch.bfloat16)
    block_ids = torch.randperm(num_blocks, generator=gen, device="cuda")[:num_pages]
    buffer = torch.full((num_layers, num_pages, 2, 16, 8, 128), float("nan"), device="cuda")
    buffer = buffer.to(torch.bfloat16)

    pack_pages(kv_cache, block_ids, out=buffer)
    target = torch.full_like(kv_cache, float("nan"))
    unpack_pages(buffer, target, block_ids)

    expected = pack_pages_reference(kv_cache, block_ids)
    torch.testing.assert_close(buffer.view(torch.int16), expected.view(torch.int16))
    torch.testing.assert_close(
        target.view(torch.int16),
        unpack_pages_reference(buffer, torch.full_like(kv_cache, float("nan")), block_ids).view(
            torch.int16
        ),
    )


@pytest.mark.gpu
def test_pack_offsets_past_int32_on_gpu() -> None:
    """Layers and blocks whose element offsets pass 2**31: 3 x 30000 pages of 32768 elements."""
    kv_cache = torch.empty((3, 30_000, 2, 16, 8, 128), device="cuda", dtype=torch.bfloat16)
    block_ids = torch.tensor([29_999, 5, 20_000, 29_998], device="cuda")
    kv_cache.view(torch.int16)[:, block_ids] = torch.randint(
        -(2**15), 2**15, (3, 4, 2, 16, 8, 128), device="cuda", dtype=torch.int16
    )

    packed = pack_pages(kv_cache, block_ids)
    torch.testing.assert_close(
        packed.view(torch.int16), pack_pages_reference(kv_cache, block_ids).view(torch.int16)
    )
    kv_cache[:, block_ids] = 0
    unpack_pages(packed, kv_cache, block_ids)
    torch.testing.assert_close(kv_cache[:, block_ids].view(torch.int16), packed.view(torch.int16))
