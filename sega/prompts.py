"""Prompt encoding for :class:`~sega.pipeline.SegaPipeline`: CLIP text embeddings laid out as the denoising
loop's UNet batches take them (``SegaXLPipeline`` overrides :meth:`encode_text` and :meth:`encode_prompts` for
SDXL's two encoders and pooled embeddings).

As ``StableDiffusionPipeline.encode_prompt``: texts go through ``maybe_convert_prompt`` (textual inversion's
multi-vector tokens), a LoRA scale applies to the text encoders' LoRA layers for the call, ``clip_skip`` takes an
earlier layer. The prompt, the negative prompt and the concepts go through the same (LoRA'd) encoder.

There is no embedding cache: one CLIP-L text pass is about 6.7 GFLOPs, one SD UNet step at 512 px with classifier-
free guidance about 0.8 TFLOPs, so a call of 50 steps spends < 0.1 % of its work on its texts (and a cache would
have to be invalidated on every LoRA, textual inversion or component change).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch
from diffusers.utils import USE_PEFT_BACKEND, logging
from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

from .concepts import ConceptSettings

logger = logging.get_logger(__name__)


@contextlib.contextmanager
def lora_scaled(encoders: Sequence[torch.nn.Module], scale: float | None) -> Iterator[None]:
    """The encoders' LoRA layers scaled by ``scale`` inside the block, as diffusers' ``encode_prompt`` does
    (None or 1: unchanged). The layers are shared with other threads' calls, as in diffusers."""
    if scale is None or not USE_PEFT_BACKEND:
        yield
        return
    for encoder in encoders:
        scale_lora_layers(encoder, scale)
    try:
        yield
    finally:
        for encoder in encoders:
            unscale_lora_layers(encoder, scale)


def final_layer_norm(encoder: torch.nn.Module) -> torch.nn.Module:
    """A CLIP text encoder's final layer norm (transformers 5's ``CLIPTextModel`` has it directly, earlier
    versions under ``text_model``)."""
    return getattr(encoder, "text_model", encoder).final_layer_norm


def clip_text_states(encoder: torch.nn.Module, ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """The last hidden states, or with ``clip_skip`` the states ``clip_skip`` layers earlier through the final
    layer norm, as ``StableDiffusionPipeline`` means it."""
    if not clip_skip:
        return encoder(ids)[0]
    hidden = encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return final_layer_norm(encoder)(hidden)


def check_clip_skip(clip_skip: int | None, encoder: torch.nn.Module) -> None:
    layers = encoder.config.num_hidden_layers
    if clip_skip is not None and (not isinstance(clip_skip, int) or not 0 <= clip_skip < layers):
        raise ValueError(f"clip_skip must be an integer in [0, {layers}) for this text encoder, got {clip_skip!r}")


# transformers' fast tokenizers keep their padding and truncation settings on the shared (Rust) tokenizer and set
# them for each call: two threads tokenizing at once could get each other's settings (an unpadded row among padded
# ones). Tokenizing is a tiny part of a call, so calls take turns; re-entrant for nested helpers.
TOKENIZER_LOCK = threading.RLock()


class PromptEncoderMixin:
    """Text encoding for a pipeline with a ``tokenizer``, a ``text_encoder`` and a ``unet``."""

    def truncated_text(self, text: str, tokenizer=None) -> str | None:
        """The part of ``text`` beyond the tokenizer's limit that will be dropped, or None."""
        tokenizer = tokenizer or self.tokenizer
        with TOKENIZER_LOCK:
            ids = tokenizer(text, truncation=False).input_ids
        limit = tokenizer.model_max_length
        if len(ids) <= limit:
            return None
        return tokenizer.decode(ids[limit - 1 : -1])

    def token_ids(self, text: str, tokenizer) -> torch.Tensor:
        """(1, model_max_length) ids of ``text`` with its textual-inversion tokens expanded; truncated (end token
        kept, as StableDiffusionPipeline does) with a warning."""
        with TOKENIZER_LOCK:
            if hasattr(self, "maybe_convert_prompt"):
                text = self.maybe_convert_prompt(text, tokenizer)
            removed = self.truncated_text(text, tokenizer)
            if removed:
                logger.warning(f"Prompt truncated to {tokenizer.model_max_length} tokens; dropped: {removed!r}")
            return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], clip_skip: int | None = None) -> torch.Tensor:
        """CLIP embeddings (len(texts), seq, dim) in the UNet's dtype on the execution device.

        Each text is encoded on its own so its embedding never depends on its batch."""
        # The UNet's dtype: transformers keeps a checkpoint's dtype where diffusers loads float32.
        device, dtype = self._execution_device, self.unet.dtype
        if not texts:
            return torch.zeros((0, self.tokenizer.model_max_length, self.text_encoder.config.hidden_size),
                               device=device, dtype=dtype)
        check_clip_skip(clip_skip, self.text_encoder)
        return torch.cat([clip_text_states(self.text_encoder, self.token_ids(text, self.tokenizer).to(device),
                                           clip_skip).to(dtype) for text in texts])

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder]

    def encode_prompts(self, prompts: list[str] | None, negative_prompts: list[str | None],
                       num_images_per_prompt: int, concepts: ConceptSettings, height: int | None = None,
                       width: int | None = None, given: dict[str, torch.Tensor | None] | None = None,
                       clip_skip: int | None = None, lora_scale: float | None = None) -> dict[str, torch.Tensor]:
        """Embeddings in latent batch order: "p" and "u" (batch, seq, dim), "c" concepts (C, batch, seq, dim).

        ``given``: ``prompt_embeds`` / ``negative_prompt_embeds`` (per prompt, as diffusers takes them) used
        instead of encoding ``prompts`` / ``negative_prompts``. ``height`` and ``width`` (the image size) are
        unused here; SDXL's micro-conditioning depends on them."""
        given = given or {}
        if given.get("pooled_prompt_embeds") is not None or given.get("negative_pooled_prompt_embeds") is not None:
            raise ValueError("pooled_prompt_embeds / negative_pooled_prompt_embeds are SDXL's (SegaXLPipeline)")
        device, dtype = self._execution_device, self.unet.dtype
        with lora_scaled(self.text_encoders(), lora_scale):
            text = given.get("prompt_embeds")
            text = self.encode_text(prompts, clip_skip) if text is None else text.to(device, dtype)
            uncond = given.get("negative_prompt_embeds")
            uncond = self.encode_text(negative_prompts, clip_skip) if uncond is None else uncond.to(device, dtype)
            if concepts.prompts is not None:
                concept = self.encode_text(concepts.prompts, clip_skip)
            elif concepts.embeddings is not None:
                concept = concepts.embeddings.to(device=device, dtype=dtype)
            else:
                concept = text[:0, 0:1]
        text = text.repeat_interleave(num_images_per_prompt, dim=0)
        uncond = uncond.repeat_interleave(num_images_per_prompt, dim=0)
        return {"p": text, "u": uncond, "c": concept[:, None].expand(-1, text.shape[0], -1, -1)}
