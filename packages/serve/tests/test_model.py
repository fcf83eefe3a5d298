"""The model side: GGUF loading (SmolLM2), tokenizer, chat template, the tiny model."""

from pathlib import Path

import pytest
import torch

from kvstack.serve import (
    ChatMessage,
    ChatTemplate,
    InvalidRequest,
    LoadedModel,
    ModelNotFound,
    UnsupportedModel,
    load_gguf,
    load_tiny,
)

# SmolLM2's template as stored in its GGUF metadata (a literal newline inside the strings).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_chat_template_renders_chatml_with_the_default_system_turn() -> None:
    template = ChatTemplate.from_jinja(SMOLLM2_TEMPLATE)
    text = template.render([ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello")])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    own = template.render([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")])
    assert own == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_refuses_what_it_cannot_render() -> None:
    with pytest.raises(UnsupportedModel, match="ChatML"):
        ChatTemplate.from_jinja("{{ bos_token }}[INST] {{ message }} [/INST]")
    with pytest.raises(InvalidRequest, match=r"role 'robot'"):
        ChatMessage("robot", "beep")


def test_missing_gguf_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"nope\.gguf"):
        load_gguf(tmp_path / "nope.gguf", name="x")


def test_tiny_model_is_seeded() -> None:
    a, b, c = load_tiny(seed=3), load_tiny(seed=3), load_tiny(seed=4)
    ids = list(range(40, 60))
    torch.testing.assert_close(a.model.dense_logits(ids), b.model.dense_logits(ids))
    assert not torch.equal(a.model.dense_logits(ids), c.model.dense_logits(ids))


def test_byte_tokenizer_round_trips_text_and_specials(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    text = "héllo <|im_end|> wörld"
    ids = tok.encode(text)
    assert tok.eos_token_id in ids
    assert tok.decode(ids) == "héllo  wörld"  # specials are not text


def test_smollm2_gguf_shape_and_tokenizer(smollm2: LoadedModel) -> None:
    c = smollm2.model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        30,
        576,
        9,
        3,
        64,
    )
    assert c.rope_base == 100000.0
    assert c.vocab_size == 49152
    tok = smollm2.tokenizer
    assert tok.encode("<|im_start|>user\n") == [1, 4093, 198]
    assert tok.encode("2024") == [34, 32, 34, 36]  # digits are split one by one (smollm pre)
    assert tok.decode(tok.encode("Grüße, 世界!")) == "Grüße, 世界!"
    assert smollm2.chat_template.default_system == (
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )


def test_smollm2_dense_forward_answers(smollm2: LoadedModel) -> None:
    # Right only if dequantization, the Q/K permutation (adjacent-pair RoPE) and the tokenizer
    # all are.
    prompt = smollm2.chat_template.render([ChatMessage("user", "What is the capital of France?")])
    ids = smollm2.tokenizer.encode(prompt)
    out = smollm2.model.dense_greedy(ids, 10, stop_ids=frozenset({smollm2.tokenizer.eos_token_id}))
    assert "Paris" in smollm2.tokenizer.decode(out)
