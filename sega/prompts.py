"""Prompt encoding for :class:`~sega.pipeline.SegaPipeline`: CLIP text embeddings, cached per text, laid out
as the denoising loop's UNet batches take them (``SegaXLPipeline`` overrides both methods for SDXL's two
encoders and pooled embeddings)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.utils import logging

from .concepts import ConceptSettings

logger = logging.get_logger(__name__)


class PromptEncoderMixin:
    """Text encoding with ``self.embedding_cache`` (an :class:`~sega.caching.LRUCache`), for a pipeline with a
    ``tokenizer``, a ``text_encoder`` and a ``unet``."""

    def truncated_text(self, text: str) -> str | None:
        """The part of ``text`` beyond the tokenizer's limit that will be dropped, or None."""
        ids = self.tokenizer(text, truncation=False).input_ids
        limit = self.tokenizer.model_max_length
        if len(ids) <= limit:
            return None
        return self.tokenizer.decode(ids[limit - 1 : -1])

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], use_cache: bool = True) -> torch.Tensor:
        """CLIP embeddings (len(texts), seq, dim) on the execution device, cached per text.

        Texts over the tokenizer's limit are truncated (end token kept, as StableDiffusionPipeline does)
        with a warning. Each text is encoded on its own so its embedding never depends on its batch.
        With ``use_cache=False`` the embedding cache is neither read nor filled.
        """
        # The UNet's dtype: transformers keeps a checkpoint's dtype where diffusers loads float32.
        device, dtype = self._execution_device, self.unet.dtype
        if not texts:
            return torch.zeros((0, self.tokenizer.model_max_length, self.text_encoder.config.hidden_size),
                               device=device, dtype=dtype)
        out = []
        for text in texts:
            key = (text, str(device), dtype)
            emb = self.embedding_cache.get(key) if use_cache else None
            if emb is None:
                removed = self.truncated_text(text)
                if removed:
                    logger.warning(f"Prompt truncated to {self.tokenizer.model_max_length} tokens; dropped: {removed!r}")
                ids = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids
                emb = self.text_encoder(ids.to(device))[0].to(dtype)
                if use_cache:
                    self.embedding_cache.put(key, emb)
            out.append(emb)
        return torch.cat(out)

    def encode_prompts(self, prompts: list[str], negative_prompts: list[str], num_images_per_prompt: int,
                       concepts: ConceptSettings, use_cache: bool, height: int | None = None,
                       width: int | None = None) -> dict[str, torch.Tensor]:
        """Embeddings in latent batch order: "p" and "u" (batch, seq, dim), "c" concepts (C, batch, seq, dim).

        ``height`` and ``width`` (the image size) are unused here; SDXL's micro-conditioning depends on them."""
        text = self.encode_text(prompts, use_cache).repeat_interleave(num_images_per_prompt, dim=0)
        uncond = self.encode_text(negative_prompts, use_cache).repeat_interleave(num_images_per_prompt, dim=0)
        if concepts.prompts is not None:
            concept = self.encode_text(concepts.prompts, use_cache)
        elif concepts.embeddings is not None:
            concept = concepts.embeddings.to(device=text.device, dtype=text.dtype)
        else:
            concept = text[:0, 0:1]
        return {"p": text, "u": uncond, "c": concept[:, None].expand(-1, text.shape[0], -1, -1)}
