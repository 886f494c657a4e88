"""How a conversation is turned into the text a model reads.

Templates live in config (``conf/model/*.yaml``, ``conf/reward/*.yaml``), never in code
branches on model names. Two kinds:

* ``TranscriptFormat``: plain text turns, e.g. the ``\\n\\nHuman: ...\\n\\nAssistant:``
  transcript the HH-RLHF prompts are written in, Vicuna's ``USER: ...
  ASSISTANT:`` form, UltraRM's ``Human: ...\\nAssistant: ...`` and Eurus-RM's
  ``[INST] ... [/INST] ...``.
* ``ChatTemplateFormat``: the tokenizer's own chat template.

Both render a conversation for generation (ending with the generation prompt) or, with a
``response``, the whole exchange for a reward model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aisp_bench.types import Message


@dataclass(eq=False)
class TranscriptFormat:
    """Plain-text turns.

    Args:
        user: template of a user turn, with ``{content}``.
        assistant: template of an earlier assistant turn, with ``{content}``.
        generation_prompt: text after the last user turn that asks for the response.
        response: template of the response appended after ``generation_prompt`` when a
            reward model scores it, with ``{content}``.
        system: text put first (e.g. Vicuna's system line); empty for none. A conversation's
            own system message replaces it, keeping its trailing separator (whitespace).
    """

    user: str = "\n\nHuman: {content}"
    assistant: str = "\n\nAssistant: {content}"
    generation_prompt: str = "\n\nAssistant:"
    response: str = " {content}"
    system: str = ""

    def __post_init__(self) -> None:
        for name in ("user", "assistant", "response"):
            if "{content}" not in getattr(self, name):
                raise ValueError(f"template {name}={getattr(self, name)!r} has no {{content}} slot")

    def render(self, messages: Sequence[Message], response: str | None = None, tokenizer=None) -> str:
        parts = [self.system]
        for m in messages:
            if m.role == "system":
                parts[0] = m.content + self.system[len(self.system.rstrip()):]
            elif m.role == "user":
                parts.append(self.user.format(content=m.content))
            else:
                parts.append(self.assistant.format(content=m.content))
        parts.append(self.generation_prompt)
        if response is not None:
            parts.append(self.response.format(content=response))
        return "".join(parts)


@dataclass(eq=False)
class ChatTemplateFormat:
    """The tokenizer's chat template (``tokenizer.apply_chat_template``).

    Args:
        system: a system message put first when the conversation has none; ``None``
            leaves the template's default.
    """

    system: str | None = None

    def render(self, messages: Sequence[Message], response: str | None = None, tokenizer=None) -> str:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("ChatTemplateFormat needs a tokenizer that has a chat template")
        conv = [{"role": m.role, "content": m.content} for m in messages]
        if self.system is not None and conv[0]["role"] != "system":
            conv.insert(0, {"role": "system", "content": self.system})
        if response is not None:
            conv.append({"role": "assistant", "content": response})
        return tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=response is None)
