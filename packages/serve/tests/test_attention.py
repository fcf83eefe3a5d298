"""Attention backends over the paged cache: the PyTorch path against plain SDPA, and the Triton
path of kvstack.kernels against the PyTorch one (CPU interpreter here, CUDA on the GPU runner)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kvstack.serve import (
    BatchLayout,
    ConfigError,
    EngineConfig,
    LLMEngine,
    LoadedModel,
    PagedKVCache,
    SamplingParams,
    TorchPagedAttention,
)

# Sequences as (context already cached, new tokens): decodes, a chunk after a cached prefix, a
# whole prompt, one that ends exactly on a block edge (block size 4).
SEQUENCES = [(5, 1), (0, 7), (9, 3), (3, 5), (11, 1)]
BLOCK_SIZE = 4
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def test_torch_paged_attention_equals_dense_sdpa() -> None:
    gen = torch.Generator().manual_seed(0)
    cache = PagedKVCache.allocate(
        num_layers=1,
        num_blocks=32,
        block_size=BLOCK_SIZE,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    backend = TorchPagedAttention(cache)
    # Blocks handed out in a scrambled order, so a wrong table lookup cannot pass by accident.
    free = torch.randperm(32, generator=gen).tolist()
    full_k, full_v, tables = [], [], []
    slots, query_start, seq_lens = [], [0], []
    for cached, new in SEQUENCES:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // BLOCK_SIZE))]
        k = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen)
        v = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen)
        for pos in range(cached):  # the cached context is already in the pages
            cache.keys[0][table[pos // BLOCK_SIZE], pos % BLOCK_SIZE] = k[pos]
            cache.values[0][table[pos // BLOCK_SIZE], pos % BLOCK_SIZE] = v[pos]
        slots += [
            table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(cached, total)
        ]
        full_k.append(k)
        full_v.append(v)
        tables.append(table)
        query_start.append(query_start[-1] + new)
        seq_lens.append(total)
    query = torch.randn(query_start[-1], HEADS, HEAD_DIM, generator=gen)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, SEQUENCES, strict=True)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, SEQUENCES, strict=True)])
    layout = BatchLayout(
        query_start=query_start,
        seq_lens=seq_lens,
        block_tables=tables,
        slot_mapping=torch.tensor(slots, dtype=torch.long),
    )
    backend.begin(layout)
    out = backend(0, query, new_k, new_v)
    for s, (cached, new) in enumerate(SEQUENCES):
        q = query[query_start[s] : query_start[s + 1]].transpose(0, 1)  # [heads, new, dim]
        k = full_k[s].repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(0, 1)
        v = full_v[s].repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(0, 1)
        mask = torch.arange(cached + new)[None, :] <= torch.arange(cached, cached + new)[:, None]
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1)
        got = out[query_start[s] : query_start[s + 1]]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_triton_backend_is_refused_off_cuda(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(
        ConfigError, match=r"needs a CUDA device \(or TRITON_INTERPRET=1\), not cpu"
    ):
        LLMEngine(tiny, EngineConfig(num_blocks=8, attention_backend="triton"))


# Run in a child: Triton reads TRITON_INTERPRET when first imported, which in this process may
# already have happened without it.
_INTERPRETED_ENGINES = """
import json, torch
from kvstack.serve import EngineConfig, LLMEngine, SamplingParams, load_tiny
torch.set_num_threads(1)
tiny = load_tiny()
gen = torch.Generator().manual_seed(0)
prompts = [torch.randint(32, 127, (n,), generator=gen).tolist() for n in (1, 15, 17, 40)]
params = SamplingParams(max_tokens=6, ignore_eos=True)
out = {}
for backend in ("torch", "triton"):
    config = EngineConfig(num_blocks=64, max_num_batched_tokens=24, attention_backend=backend)
    engine = LLMEngine(tiny, config)
    out[backend] = {"name": engine.attention.name, "tokens": engine.generate(prompts, params)}
print(json.dumps(out))
"""


def test_triton_backend_matches_torch_under_the_interpreter() -> None:
    # kvstack.kernels' cache write and paged attention, interpreted on CPU, inside the engine:
    # chunked prefills mixed with decodes give the same greedy tokens as the PyTorch path.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETED_ENGINES],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["torch"]["name"], out["triton"]["name"]) == ("torch", "triton")
    assert out["triton"]["tokens"] == out["torch"]["tokens"]


@pytest.mark.gpu
def test_triton_backend_matches_torch_backend_on_cuda(tiny: LoadedModel) -> None:
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs a CUDA device")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(32, 127, (n,), generator=gen).tolist() for n in (1, 15, 17, 40, 99)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        config = EngineConfig(
            num_blocks=128,
            max_num_batched_tokens=32,
            device="cuda",
            dtype="float32",
            attention_backend=backend,
        )
        engine = LLMEngine(tiny, config)
        outputs[backend] = engine.generate(prompts, params)
    assert outputs["triton"] == outputs["torch"]
