"""Chat templates: render a conversation to the prompt text the model was trained on.

We do not run Jinja. The one template family we serve, ChatML (SmolLM2's metadata template), is
recognised by its markers and rendered by ``ChatTemplate.render``; its default system prompt is
read out of the template text, so the rendering is the template's own, token for token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from kvstack.serve.errors import InvalidRequest, UnsupportedModel

__all__ = ["ChatMessage", "ChatTemplate"]

ROLES = ("system", "user", "assistant")

# SmolLM2: {% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n...
# The newline may be written as an escape or, as in SmolLM2's GGUF, as a literal newline.
_DEFAULT_SYSTEM = re.compile(
    r"'<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>(?:\\n|\n)'", re.DOTALL
)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidRequest("messages.role", f"role {self.role!r} is not one of {ROLES}")


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """ChatML rendering; ``default_system`` is inserted when the first turn is not a system one."""

    default_system: str | None

    @classmethod
    def from_jinja(cls, template: str) -> ChatTemplate:
        """Recognise a ChatML Jinja template; raises UnsupportedModel for anything else."""
        if "<|im_start|>" not in template or "<|im_end|>" not in template:
            raise UnsupportedModel("chat template (only ChatML is rendered)", template[:80])
        match = _DEFAULT_SYSTEM.search(template)
        default = match.group(1) if match else None
        return cls(default_system=default)

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        """The prompt text; ends with the assistant header when ``add_generation_prompt``."""
        if not messages:
            raise InvalidRequest("messages", "must hold at least one message")
        parts: list[str] = []
        if self.default_system is not None and messages[0].role != "system":
            parts.append(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
        parts.extend(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)
