"""Chat messages -> the prompt text a chat model was trained on, through its Jinja chat template.

An instruction-tuned model saw every conversation wrapped in its own markers; SmolLM2's::

    <|im_start|>system
    You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    <|im_start|>user
    What is the capital of France?<|im_end|>
    <|im_start|>assistant

The template that writes this ships with the model (``tokenizer.chat_template`` in a GGUF,
``chat_template`` in ``tokenizer_config.json``). ``render_chat`` renders it the way HF
transformers' ``apply_chat_template`` does (a sandboxed Jinja environment with the same options
and helpers), so the token ids are the same. A model without a template of its own gets
``FALLBACK_CHAT_TEMPLATE``: one ``role: content`` line per message, then ``assistant:``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import NoReturn

from cb_lab.exceptions import ConfigurationError, ValidationError

__all__ = ["FALLBACK_CHAT_TEMPLATE", "Message", "check_messages", "render_chat"]

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def check_messages(messages: object) -> list[Message]:
    """``messages`` as a list of ``{"role", "content"}`` dicts of strings; ValidationError names what is not."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValidationError(f"a conversation is a non-empty list of {{'role': ..., 'content': ...}} dicts, "
                              f"got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValidationError(f"message {i} must be a dict with a str 'role' and a str 'content', got {m!r:.80}")
    return list(messages)


def _raise_exception(message: str) -> NoReturn:
    raise ValidationError(f"the chat template refused the conversation: {message}")


def render_chat(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                **special_tokens: str | None) -> str:
    """The prompt text of ``messages`` under ``template`` (``special_tokens``: ``bos_token=...`` and the
    like, which templates may use). Ends with the assistant's header when ``add_generation_prompt``."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ConfigurationError("chat templates need the 'jinja2' package: pip install jinja2") from None
    if not isinstance(template, str):
        raise ConfigurationError(f"a chat template is a str of Jinja, got {type(template).__name__}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        text: str = env.from_string(template).render(messages=check_messages(messages),
                                                     add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateError as e:  # a broken template (or one that reads a key the messages lack)
        raise ConfigurationError(f"the chat template does not render: {e}") from None
    return text

