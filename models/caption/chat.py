"""The caption engine's whole input, decided in one place for every backend and for training.

A request is one user turn: the fusion prompt, then the image it ends with (``[IMAGE]:``),
no system turn of our own. :func:`user_turn` is that conversation; an OpenAI-compatible
endpoint receives it as its chat messages. A local engine (transformers, SGLang) and
``train``'s samples receive :func:`chat_text`: the same turn rendered by the checkpoint's own
chat template with its generation prompt, which fixes the system text, the turn markers and
where the image placeholder goes (llava-hf's LLaVA-NeXT templates put the image first, as
LLaVA's training does), and tokenised by the checkpoint's tokenizer on every backend.

Why one function: a backend that laid out its own template once sent every request 94 tokens
of system text and the image after the prompt, which the model never saw in training, and
no caption matched the other backend's (``tests/test_prompt_parity.py``).
"""

from __future__ import annotations

from typing import Any

from models.errors import ConfigError


def user_turn(prompt: str, image: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The conversation of one request: a user turn holding the prompt, then the image
    (``image``: an endpoint's ``image_url`` part; by default the template's image slot)."""
    return [{"role": "user", "content": [{"type": "text", "text": prompt}, image or {"type": "image"}]}]


def chat_text(processor, prompt: str) -> str:
    """The model's input text for ``prompt``: :func:`user_turn` in the checkpoint's chat
    template, ready for generation; its one image placeholder (the processor's ``image_token``)
    is what each backend expands into the image's tokens (LLaVA's AnyRes tiles, Qwen's dynamic resolution)."""
    return processor.apply_chat_template(user_turn(prompt), add_generation_prompt=True)


def reply_separator(processor) -> str:
    """What the checkpoint's template puts between :func:`chat_text` and the assistant's reply
    (LLaVA's vicuna template a space after ``ASSISTANT:``, Qwen's nothing after ``assistant\\n``):
    ``train``'s target is that reply, then the end-of-sequence token generation stops at."""
    marker = "CAPTION"
    chat = chat_text(processor, marker)
    answered = processor.apply_chat_template(
        [*user_turn(marker), {"role": "assistant", "content": [{"type": "text", "text": marker}]}])
    reply = answered[len(chat):]
    if not answered.startswith(chat) or marker not in reply:
        raise ConfigError("the checkpoint's chat template does not render an assistant turn after its generation "
                          "prompt: give it the template the model was trained with")
    return reply[:reply.index(marker)]


def check_chat_template(processor, model: str) -> None:
    """Before any work: the checkpoint has a chat template, and it renders a request with exactly
    one image placeholder (zero would caption without the image, silently)."""
    if not getattr(processor, "chat_template", None):
        raise ConfigError(f"caption model {model!r} has no chat template in its processor: add the "
                          f"template it was trained with (chat_template.jinja beside its tokenizer)")
    if not getattr(processor, "image_token", None):
        raise ConfigError(f"caption model {model!r}: its processor names no image token: the folder needs "
                          f"its family's processor (processor_config.json beside the tokenizer)")
    placeholders = chat_text(processor, "").count(processor.image_token)
    if placeholders != 1:
        raise ConfigError(f"caption model {model!r}: its chat template renders {placeholders} image "
                          f"placeholders ({processor.image_token!r}) for one image")
