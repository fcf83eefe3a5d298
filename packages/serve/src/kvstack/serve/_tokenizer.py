"""Tokenizers: GPT-2 byte-level BPE built from a GGUF vocabulary, and a byte tokenizer for tests.

Both are ``tokenizers.Tokenizer`` objects behind one small class, so the engine sees one type.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from kvstack.serve.errors import UnsupportedModel

__all__ = ["TextTokenizer", "byte_tokenizer", "gguf_bpe_tokenizer"]

# Control tokens of the byte tokenizer, after the 256 byte tokens (ChatML, as SmolLM2 uses).
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


class TextTokenizer:
    """Text to token ids and back; ``eos_token_id`` ends generation unless told otherwise."""

    def __init__(
        self, tokenizer: Tokenizer, *, eos_token_id: int, bos_token_id: int | None
    ) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text map to their ids."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special tokens left out; a cut UTF-8 sequence ends in U+FFFD."""
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        """Id of a token string, or None when it is not in the vocabulary."""
        return self._tokenizer.token_to_id(token)


def _byte_level_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _BYTE_OF_CHAR[ch])


def _byte_char_table() -> dict[str, int]:
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table: dict[str, int] = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_OF_CHAR = _byte_char_table()


def byte_tokenizer() -> TextTokenizer:
    """Ids 0-255 are bytes, then ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (EOS)."""
    vocab = {ch: _BYTE_OF_CHAR[ch] for ch in _byte_level_alphabet()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS]
    )
    eos = tok.token_to_id("<|im_end|>")
    bos = tok.token_to_id("<|im_start|>")
    if eos is None:
        raise UnsupportedModel("byte tokenizer", "missing <|im_end|>")
    return TextTokenizer(tok, eos_token_id=eos, bos_token_id=bos)


# GGUF token types (gguf.TokenType): CONTROL tokens are specials matched whole in the text.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# SmolLM2's pre-tokenizer ("smollm" in llama.cpp): every digit alone, then GPT-2's byte level.
_PRETOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
}


def gguf_bpe_tokenizer(
    *,
    tokens: Sequence[str],
    merges: Sequence[str],
    token_types: Sequence[int],
    pre: str,
    eos_token_id: int,
    bos_token_id: int | None,
) -> TextTokenizer:
    """The GPT-2 byte-level BPE described by GGUF ``tokenizer.ggml.*`` metadata."""
    if pre not in _PRETOKENIZERS:
        raise UnsupportedModel("tokenizer.ggml.pre", pre)
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))  # pyrefly: ignore[bad-argument-type]  # the stub wants list[tuple[str, str]]; split(" ", 1) gives exactly that
    tok.pre_tokenizer = _PRETOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, kind in enumerate(token_types)
        if kind in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    ]
    tok.add_special_tokens(specials)
    return TextTokenizer(tok, eos_token_id=eos_token_id, bos_token_id=bos_token_id)
