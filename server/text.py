"""Text parameters (prompts): control characters removed, length checked, the tokenizer's truncation said."""

from __future__ import annotations

import unicodedata

from .context import Context
from .errors import InvalidInput


def clean_text(name: str, value, max_chars: int) -> tuple[str, list[str]]:
    """Text without control characters (tabs and newlines become spaces), stripped; with notices."""
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidInput(f"{name} must be at most {max_chars} characters, got {len(value)}")
    kept, removed = [], 0
    for ch in value:
        if unicodedata.category(ch) == "Cc":
            removed += 1
            if ch in "\t\n\r":
                kept.append(" ")
        else:
            kept.append(ch)
    notices = [f"{name}: removed {removed} control character(s)."] if removed else []
    return "".join(kept).strip(), notices


def text(name: str, value, ctx: Context, *, required: bool = False) -> str:
    """A prompt-like text: cleaned, with a notice when the tokenizer will truncate it."""
    cleaned, notices = clean_text(name, value, ctx.limits.max_prompt_chars)
    if required and not cleaned:
        raise InvalidInput(f"{name} must be non-empty text")
    ctx.notices += notices
    # SegaFluxPipeline has no truncation report (T5 takes 256 or 512 tokens; CLIP's 77 feed only its pooled vector).
    truncated = getattr(ctx.loaded.pipe, "truncated_text", None)
    dropped = truncated(cleaned) if cleaned and truncated else None
    if dropped:
        limit = ctx.loaded.pipe.tokenizer.model_max_length
        ctx.notices.append(f"{name} is longer than the model's {limit}-token limit; this part was ignored: {dropped!r}.")
    return cleaned
