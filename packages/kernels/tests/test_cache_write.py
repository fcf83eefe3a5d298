"""Cache write against its reference: bit-exact scatter, padding skipped, inputs checked."""

from __future__ import annotations

import pytest
import torch

from kvstack.kernels import BadDevice, BadDtype, BadLayout, BadShape, write_kv_cache
from kvstack.kernels.cache_write import cache_write_config, write_kv_cache_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (num_tokens, num_blocks, block_size): one token; a token count that is no multiple of anything;
# more tokens than one page holds so writes land on many pages; block size 1 (every token its own
# page) and 32.
SHAPES = [(1, 4, 16), (37, 12, 16), (130, 64, 16), (9, 20, 1), (45, 8, 32)]
# (num_kv_heads, head_size): GQA-sized head counts; head 64 and 128, plus 80 (not a power of two,
# so the row tile is masked) and a single head.
HEADS = [(1, 64), (2, 128), (8, 128), (3, 80)]
# Every dtype is copied as bits; bf16 and fp8 would be computed wrong by the interpreter if the
# kernel did arithmetic on them, so they are tested too.
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]
SEEDS = [0, 1]


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


def _nan(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), device=DEVICE).to(dtype)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("num_kv_heads", "head_size"), HEADS)
@pytest.mark.parametrize(("num_tokens", "num_blocks", "block_size"), SHAPES)
def test_write_matches_reference(
    *,
    num_tokens: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    key = _random((num_tokens, num_kv_heads, head_size), dtype, gen)
    value = _random((num_tokens, num_kv_heads, head_size), dtype, gen)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_size)
    # Poisoned caches: a slot the kernel writes wrong or not at all stays NaN, one it must not
    # touch must stay NaN in both.
    key_cache = _nan(cache_shape, dtype)
    value_cache = _nan(cache_shape, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    # About a quarter of the tokens are padding (-1) and must be skipped.
    padding = torch.rand(num_tokens, generator=gen) < 0.25
    slot_mapping = torch.where(padding, -1, slots).to(DEVICE)
    expected_key, expected_value = write_kv_cache_reference(
        key, value, key_cache, value_cache, slot_mapping
    )

    write_kv_cache(key, value, key_cache, value_cache, slot_mapping)

    # Bit-exact (NaN == NaN by bits): the kernel moves bits, it must not round anything.
    torch.testing.assert_close(key_cache.view(torch.uint8), expected_key.view(torch.uint8))
    torch.testing.assert_close(value_cache.view(torch.uint8), expected_value.view(torch.uint8))


def test_strided_inputs_and_interleaved_cache() -> None:
    """K/V sliced from a fused QKV row; caches that are views of one [blocks, 2, ...] tensor."""
    gen = torch.Generator().manual_seed(7)
    num_tokens, heads, head_size, num_blocks, block_size = 21, 2, 64, 6, 16
    qkv = _random((num_tokens, 3 * heads, head_size), torch.float16, gen)
    key, value = qkv[:, heads : 2 * heads], qkv[:, 2 * heads :]
    kv_cache = _nan((num_blocks, 2, block_size, heads, head_size), torch.float16)
    key_cache, value_cache = kv_cache.unbind(1)
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    expected_key, expected_value = write_kv_cache_reference(
        key, value, key_cache, value_cache, slot_mapping
    )

    write_kv_cache(key, value, key_cache, value_cache, slot_mapping)

    torch.testing.assert_close(key_cache, expected_key, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(value_cache, expected_value, atol=0, rtol=0, equal_nan=True)


def _valid_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "key": _random((5, 2, 64), torch.float16, gen),
        "value": _random((5, 2, 64), torch.float16, gen),
        "key_cache": _nan((4, 16, 2, 64), torch.float16),
        "value_cache": _nan((4, 16, 2, 64), torch.float16),
        "slot_mapping": torch.arange(5, device=DEVICE),
    }


@pytest.mark.parametrize(
    ("name", "bad", "error", "match"),
    [
        ("key", torch.zeros(5, 128), BadShape, r"key: has shape \[5, 128\]"),
        ("value", torch.zeros(5, 2, 32, dtype=torch.float16), BadShape, r"value: .*\[5, 2, 32\]"),
        ("key_cache", torch.zeros(4, 16, 4, 64, dtype=torch.float16), BadShape, "key_cache"),
        ("value_cache", torch.zeros(4, 8, 2, 64, dtype=torch.float16), BadShape, "value_cache"),
        ("slot_mapping", torch.arange(6), BadShape, r"slot_mapping: has shape \[6\]"),
        ("slot_mapping", torch.zeros(5), BadDtype, "slot_mapping: has dtype float32"),
        ("value", torch.zeros(5, 2, 64), BadDtype, "value: has dtype float32"),
        (
            "key_cache",
            torch.zeros(4, 2, 16, 64, dtype=torch.float16).transpose(1, 2),
            BadLayout,
            "key_cache: .* must be contiguous",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_inputs_name_the_tensor(
    name: str, bad: torch.Tensor, error: type[Exception], match: str
) -> None:
    inputs = _valid_inputs()
    inputs[name] = bad.to(DEVICE)
    with pytest.raises(error, match=match):
        write_kv_cache(**inputs)


def test_devices_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = _valid_inputs()
    inputs["slot_mapping"] = torch.arange(5, device="meta")
    with pytest.raises(BadDevice, match=r"slot_mapping: is on meta but key is on"):
        write_kv_cache(**inputs)
    # CPU tensors need the interpreter: without it Triton has nothing to run them on.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = {name: tensor.cpu() for name, tensor in _valid_inputs().items()}
    with pytest.raises(BadDevice, match="key: is on cpu; Triton kernels run on CUDA tensors"):
        write_kv_cache(**cpu)


def test_config_covers_the_row() -> None:
    for heads, head_size in [(1, 64), (8, 128), (3, 80), (64, 256)]:
        config = cache_write_config(heads, head_size)
        assert config.tile * config.tiles_per_token >= heads * head_size
        assert config.tile & (config.tile - 1) == 0


@pytest.mark.gpu
def test_write_llama_sized_bf16_on_gpu() -> None:
    gen = torch.Generator().manual_seed(11)
    num_tokens, heads, head_size, num_blocks, block_size = 4096, 8, 128, 2048, 16
    key = torch.randn(num_tokens, heads, head_size, generator=gen).to("cuda", torch.bfloat16)
    value = torch.randn(num_tokens, heads, head_size, generator=gen).to("cuda", torch.bfloat16)
    key_cache = torch.full((num_blocks, block_size, heads, head_size), float("nan"), device="cuda")
    key_cache = key_cache.to(torch.bfloat16)
    value_cache = key_cache.clone()
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slot_mapping[::17] = -1
    slot_mapping = slot_mapping.to("cuda")
    expected_key, expected_value = write_kv_cache_reference(
        key, value, key_cache, value_cache, slot_mapping
    )

    write_kv_cache(key, value, key_cache, value_cache, slot_mapping)

    torch.testing.assert_close(key_cache.view(torch.int16), expected_key.view(torch.int16))
    torch.testing.assert_close(value_cache.view(torch.int16), expected_value.view(torch.int16))


@pytest.mark.gpu
def test_write_past_int32_offsets_on_gpu() -> None:
    """Slots whose element offsets pass 2**31 (150000 blocks of 16 x 8 x 128)."""
    num_blocks, block_size, heads, head_size = 150_000, 16, 8, 128
    key_cache = torch.zeros(
        num_blocks, block_size, heads, head_size, device="cuda", dtype=torch.bfloat16
    )
    value_cache = torch.zeros_like(key_cache)
    key = torch.randn(3, heads, head_size, device="cuda").to(torch.bfloat16)
    value = torch.randn(3, heads, head_size, device="cuda").to(torch.bfloat16)
    last = num_blocks * block_size - 1
    slot_mapping = torch.tensor([last, -1, last - 17], device="cuda")

    write_kv_cache(key, value, key_cache, value_cache, slot_mapping)

    flat_k = key_cache.view(-1, heads, head_size)
    flat_v = value_cache.view(-1, heads, head_size)
    torch.testing.assert_close(flat_k[last], key[0], atol=0, rtol=0)
    torch.testing.assert_close(flat_v[last - 17], value[2], atol=0, rtol=0)
