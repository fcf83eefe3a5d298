"""The OpenAI wire format: request bodies (pydantic) and error objects."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvstack.serve._chat import ChatMessage
from kvstack.serve._sampling import SamplingParams
from kvstack.serve.errors import InvalidRequest

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "error_body",
]

DEFAULT_MAX_TOKENS = 16


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` is honoured."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do; the ones we cannot honour
    # (n > 1, logprobs) are refused below.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None)
    temperature: float = 1.0  # OpenAI's default; 0 is greedy
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False  # vLLM's extension: fixed output lengths for benchmarks
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """The engine's parameters; raises InvalidRequest naming the bad field."""
        if self.n != 1:
            raise InvalidRequest("n", f"only n=1 is supported, got {self.n}")
        if self.logprobs not in (None, False, 0):
            raise InvalidRequest("logprobs", "logprobs are not supported")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            stop_token_ids=frozenset(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: str | list[int] | list[str]
    echo: bool = False

    def prompt_value(self) -> str | list[int]:
        """The single prompt; raises InvalidRequest for batches."""
        if self.echo:
            raise InvalidRequest("echo", "echo is not supported")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise InvalidRequest("prompt", "only one prompt per request is supported")
            return self.prompt[0]
        return self.prompt  # pyrefly: ignore[bad-return]  # a list here holds ints: list[str] returned above


class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[_ContentPart] | None = None


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[_Message]
    max_completion_tokens: int | None = None

    def chat_messages(self) -> list[ChatMessage]:
        """Messages with text content; raises InvalidRequest for empty or unknown roles."""
        if not self.messages:
            raise InvalidRequest("messages", "must hold at least one message")
        out = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role  # OpenAI's newer name
            if isinstance(m.content, list):
                content = "".join(part.text for part in m.content)
            else:
                content = m.content or ""
            out.append(ChatMessage(role=role, content=content))
        return out

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the current name) or ``max_tokens``."""
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


def error_body(message: str, *, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
