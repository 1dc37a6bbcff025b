"""SegaXLPipeline: semantic guidance on Stable Diffusion XL, with :class:`~sega.pipeline.SegaPipeline`'s
denoising loop, guidance, caches and inversion.

Only the model-specific parts differ, each as diffusers' ``StableDiffusionXLPipeline`` (0.42) does them:

- text: two CLIP text encoders, the penultimate hidden states of both concatenated, the second encoder's
  projected (pooled) output as ``text_embeds``; with ``force_zeros_for_empty_prompt`` (SDXL base's setting) and
  no ``negative_prompt`` the unconditional embeddings are zeros;
- the UNet's added conditioning: ``text_embeds`` per segment and the micro-conditioning ``time_ids``
  (original size, crop top-left (0, 0), target size: here the image's own size, SDXL's default);
- the VAE: upcast to float32 for decoding and encoding when it is float16 with ``force_upcast`` (SDXL base's
  VAE overflows in float16), ``latents_mean`` / ``latents_std`` where the VAE config has them;
- native size ``unet.config.sample_size * vae_scale_factor`` (1024 for SDXL base) and guidance 5 by default.

Every segment of the batched UNet call (unconditional, prompt, each concept) carries its own embeddings and
pooled embeddings, as LEDITS++'s SDXL pipeline conditions its concepts.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import is_invisible_watermark_available, logging
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .caching import LRUCache
from .concepts import ConceptSettings
from .loaders import counts_weight_changes
from .pipeline import SegaPipeline
from .prompts import lora_scaled

logger = logging.get_logger(__name__)


@counts_weight_changes
class SegaXLPipeline(StableDiffusionXLLoraLoaderMixin, SegaPipeline):
    r"""Text-to-image generation and image editing with semantic guidance (SEGA) on Stable Diffusion XL.

    Load an SDXL checkpoint in diffusers format with ``SegaXLPipeline.from_pretrained(hub_id_or_folder,
    dtype=torch.float16)`` (e.g. ``stabilityai/stable-diffusion-xl-base-1.0``) or pass the components. Every
    argument of :meth:`SegaPipeline.__call__` and :meth:`SegaPipeline.invert` works the same way; the
    differences are SDXL's: ``guidance_scale`` defaults to 5 (as ``StableDiffusionXLPipeline``), the default
    size is 1024x1024 for SDXL base, and ``editing_prompt_embeddings`` is not supported (SDXL needs pooled
    embeddings too: pass concept texts).

    Args:
        vae: the variational auto-encoder (SDXL's, ``force_upcast=True``, or an fp16-safe one).
        text_encoder: CLIP ViT-L text encoder (its penultimate hidden states are used).
        text_encoder_2: OpenCLIP bigG text encoder with projection (hidden states and pooled ``text_embeds``).
        tokenizer, tokenizer_2: their tokenizers.
        unet: a UNet with ``addition_embed_type="text_time"``.
        scheduler: any diffusers scheduler.
        force_zeros_for_empty_prompt: without ``negative_prompt``, the unconditional embeddings are zeros
            (SDXL base: True); with a negative prompt (even ""), it is encoded.
        add_watermarker: apply SDXL's invisible watermark (needs the ``invisible-watermark`` package; default:
            when it is installed, as ``StableDiffusionXLPipeline``).
        inversion_cache_size: as :class:`SegaPipeline`.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = []
    _exclude_from_cpu_offload = []
    default_guidance_scale = 5.0  # StableDiffusionXLPipeline's

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer,
        tokenizer_2,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        inversion_cache_size: int = 4,
    ):
        DiffusionPipeline.__init__(self)
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.safety_checker, self.feature_extractor = None, None
        add_watermarker = is_invisible_watermark_available() if add_watermarker is None else add_watermarker
        if add_watermarker:
            from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker

            self.watermark = StableDiffusionXLWatermarker()
        else:
            self.watermark = None
        self.inversion_cache = LRUCache(inversion_cache_size)
        # A float16 VAE with force_upcast is switched to float32 while it decodes or encodes (as diffusers
        # does); calls may run in parallel threads, so one at a time.
        self._vae_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------
    # Text
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states (len(texts), seq, dim_1 + dim_2), pooled (len(texts), projection_dim)) in the UNet's
        dtype on the execution device.

        As ``StableDiffusionXLPipeline.encode_prompt``: textual-inversion tokens expanded for each tokenizer,
        which pads to its ``model_max_length`` and truncates (with a warning); the penultimate hidden states of
        both encoders (``clip_skip`` layers earlier with it) concatenated; the pooled embedding is the second
        encoder's projected output.
        """
        device, dtype = self._execution_device, self.unet.dtype
        layers = min(self.text_encoder.config.num_hidden_layers, self.text_encoder_2.config.num_hidden_layers)
        if clip_skip is not None and (not isinstance(clip_skip, int) or not 0 <= clip_skip < layers - 1):
            raise ValueError(f"clip_skip must be an integer in [0, {layers - 1}) for these text encoders, "
                             f"got {clip_skip!r}")
        layer = -(2 + (clip_skip or 0))  # SDXL always counts from the penultimate layer
        hidden, pooled = [], []
        for text in texts:
            states, pool = [], None
            for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                out = encoder(self.token_ids(text, tokenizer).to(device), output_hidden_states=True)
                if out[0].ndim == 2:  # the projected, pooled output (CLIPTextModelWithProjection)
                    pool = out[0]
                states.append(out.hidden_states[layer])
            if pool is None:
                raise ValueError("text_encoder_2 must return pooled embeddings (CLIPTextModelWithProjection)")
            hidden.append(torch.cat(states, dim=-1).to(dtype))
            pooled.append(pool.to(dtype))
        if not hidden:
            raise ValueError("encode_text needs at least one text")
        return torch.cat(hidden), torch.cat(pooled)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def check_inputs(self, prompt, negative_prompt, height, width, num_inference_steps, callback_steps,
                     callback_on_step_end_tensor_inputs, prompt_embeds: torch.Tensor | None = None,
                     negative_prompt_embeds: torch.Tensor | None = None) -> tuple[list[str] | None, list[str | None]]:
        """As :meth:`SegaPipeline.check_inputs`; without ``negative_prompt`` and with
        ``force_zeros_for_empty_prompt``, the negative prompts are None: zero embeddings."""
        prompts, negatives = super().check_inputs(prompt, negative_prompt, height, width, num_inference_steps,
                                                  callback_steps, callback_on_step_end_tensor_inputs, prompt_embeds,
                                                  negative_prompt_embeds)
        if negative_prompt is None and self.config.force_zeros_for_empty_prompt:
            negatives = [None] * len(negatives)
        return prompts, negatives

    def given_or_encoded(self, given: dict, name: str, texts: list[str] | None,
                         clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``given[name]`` with its pooled embeddings (both needed, as in diffusers), or ``texts`` encoded."""
        embeds, pooled = given.get(name), given.get(name.replace("prompt_embeds", "pooled_prompt_embeds"))
        if embeds is None:
            return self.encode_text(texts, clip_skip)
        if pooled is None:
            raise ValueError(f"{name} needs its pooled embeddings too ({name.replace('prompt', 'pooled_prompt')})")
        device, dtype = self._execution_device, self.unet.dtype
        return embeds.to(device, dtype), pooled.to(device, dtype)

    def time_ids(self, height: int, width: int) -> torch.Tensor:
        """SDXL's micro-conditioning (1, 6): original size, crop top-left (0, 0), target size, as
        ``StableDiffusionXLPipeline`` sets it by default (both sizes the image's own)."""
        ids = [height, width, 0, 0, height, width]
        expected = self.unet.add_embedding.linear_1.in_features
        passed = self.unet.config.addition_time_embed_dim * len(ids) + self.text_encoder_2.config.projection_dim
        if expected != passed:
            raise ValueError(f"the UNet expects an added embedding of {expected} values but the time ids and "
                             f"text_encoder_2's projection make {passed}: the components do not belong together")
        return torch.tensor([ids], device=self._execution_device, dtype=self.unet.dtype)

    def encode_prompts(self, prompts: list[str] | None, negative_prompts: list[str | None],
                       num_images_per_prompt: int, concepts: ConceptSettings, height: int | None = None,
                       width: int | None = None, given: dict[str, torch.Tensor | None] | None = None,
                       clip_skip: int | None = None, lora_scale: float | None = None) -> dict[str, dict]:
        """Per segment, the UNet's keyword arguments in latent batch order: "p" and "u" (batch rows), "c"
        (C, batch rows): ``encoder_hidden_states`` and ``added_cond_kwargs`` (``text_embeds``, ``time_ids``).
        ``given``: diffusers' ``prompt_embeds``, ``pooled_prompt_embeds`` and their negatives, instead of texts."""
        n, given = num_images_per_prompt, given or {}
        if concepts.embeddings is not None:
            raise ValueError("editing_prompt_embeddings: SegaXLPipeline needs pooled embeddings too; pass the concept "
                             "texts (editing_prompt or concepts)")
        with lora_scaled(self.text_encoders(), lora_scale):
            hidden, pooled = self.given_or_encoded(given, "prompt_embeds", prompts, clip_skip)
            if given.get("negative_prompt_embeds") is None and all(neg is None for neg in negative_prompts):
                neg_hidden, neg_pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
            else:
                neg_hidden, neg_pooled = self.given_or_encoded(
                    given, "negative_prompt_embeds", ["" if neg is None else neg for neg in negative_prompts],
                    clip_skip)
            if concepts.prompts:
                c_hidden, c_pooled = self.encode_text(concepts.prompts, clip_skip)
            else:
                c_hidden, c_pooled = hidden[:0], pooled[:0]
        time_ids = self.time_ids(height, width)
        batch = hidden.shape[0] * n

        def segment(states: torch.Tensor, pool: torch.Tensor) -> dict:
            return {"encoder_hidden_states": states.repeat_interleave(n, dim=0),
                    "added_cond_kwargs": {"text_embeds": pool.repeat_interleave(n, dim=0),
                                          "time_ids": time_ids.expand(batch, -1)}}

        return {
            "p": segment(hidden, pooled),
            "u": segment(neg_hidden, neg_pooled),
            "c": {"encoder_hidden_states": c_hidden[:, None].expand(-1, batch, -1, -1),
                  "added_cond_kwargs": {"text_embeds": c_pooled[:, None].expand(-1, batch, -1),
                                        "time_ids": time_ids.expand(len(c_hidden), batch, -1)}},
        }

    # ------------------------------------------------------------------------------------------
    # VAE
    # ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _vae_in_float32_if_needed(self):
        """As ``StableDiffusionXLPipeline``: a float16 VAE with ``force_upcast`` works in float32."""
        if not (self.vae.dtype == torch.float16 and self.vae.config.force_upcast):
            yield
            return
        with self._vae_lock:
            self.vae.to(dtype=torch.float32)
            try:
                yield
            finally:
                self.vae.to(dtype=torch.float16)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        config = self.vae.config
        if getattr(config, "latents_mean", None) is None or getattr(config, "latents_std", None) is None:
            return None
        channels = len(config.latents_mean)
        return (torch.tensor(config.latents_mean).view(1, channels, 1, 1).to(like.device, like.dtype),
                torch.tensor(config.latents_std).view(1, channels, 1, 1).to(like.device, like.dtype))

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._vae_in_float32_if_needed():
            x0 = self.vae.encode(pixels.to(device=self._execution_device, dtype=self.vae.dtype)).latent_dist.mode()
        stats = self._latent_stats(x0)
        if stats is not None:
            return (x0 - stats[0]) * self.vae.config.scaling_factor / stats[1]
        return x0 * self.vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor, dtype):
        stats = self._latent_stats(latents)
        if stats is not None:
            latents = latents * stats[1] / self.vae.config.scaling_factor + stats[0]
        else:
            latents = latents / self.vae.config.scaling_factor
        with self._vae_in_float32_if_needed():
            image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return image, None
