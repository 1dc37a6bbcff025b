"""Edit-friendly DDPM inversion of real images (Huberman-Spiegelglas, Kulikov and Michaeli, CVPR 2024,
arXiv 2304.06140), as LEDITS++ (Brack et al., CVPR 2024) uses it with a DDIM scheduler at eta = 1.

For the performed timesteps t_1 > ... > t_n (the first ``skip`` share of the schedule left out), every
x_t is drawn *independently* from q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I). Then, from the noisiest step
down, the noise map z_t is what makes one stochastic DDIM step land exactly on the next x:

    x_prev = mu(x_t, e(x_t)) + sigma_t z_t   =>   z_t = (x_prev - mu(x_t, e(x_t))) / sigma_t

and x_prev is replaced by mu + sigma_t z_t so rounding errors never accumulate. Denoising from x_{t_1} with
``variance_noise=z_t`` and the same estimates e reproduces x_0; changing e (edit concepts) edits the image
while the noise maps keep its structure. mu and sigma_t are the scheduler's own (``DDIMScheduler.step`` with
zero variance noise), so reconstruction and inversion can never disagree about the formulas.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from .concepts import ConceptSettings
from .denoising import Denoising
from .guidance import classifier_free_guidance
from .stopping import StopFlag, check_stop


@dataclass
class SegaInversion:
    """A real image inverted for editing; pass it to ``SegaPipeline(..., inversion=...)``.

    Args:
        latents: (B, ch, h, w) the start latents x at the first performed timestep.
        noise_maps: (n, B, ch, h, w) the noise map of each performed step, in denoising order.
        image_latents: (B, ch, h, w) the input image as the VAE sees it (scaled latents); a run without edits
            with ``source_prompt`` and ``source_guidance_scale`` ends here.
        timesteps: (n,) the performed timesteps, from the noisiest.
        scheduler: the DDIM scheduler (set to the whole schedule) that the edit must use.
        source_prompt, source_guidance_scale, num_inference_steps, skip: the settings it was made with.
        height, width: the image size in pixels.
        key: a digest of the image content and the settings (its key in ``SegaPipeline.inversion_cache``).
        cache_hit: whether it came from ``SegaPipeline.inversion_cache``.
        unet_calls, unet_samples: UNet work done to compute it (0 on a cache hit).
    """

    latents: torch.Tensor
    noise_maps: torch.Tensor
    image_latents: torch.Tensor
    timesteps: torch.Tensor
    scheduler: DDIMScheduler
    source_prompt: str
    source_guidance_scale: float
    num_inference_steps: int
    skip: float
    height: int
    width: int
    key: str
    cache_hit: bool = False
    unet_calls: int = 0
    unet_samples: int = 0

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]


def inversion_scheduler(config) -> DDIMScheduler:
    """A DDIM scheduler for inversion from any scheduler's config.

    As LEDITS++: "leading" spacing (DDIM's step assumes it), ``steps_offset=1`` and no clipping of x_0. And
    ``set_alpha_to_one=False`` (Stable Diffusion's own setting), so the last step has noise too and can carry
    the last correction: the reconstruction is exact.
    """
    return DDIMScheduler.from_config(config, timestep_spacing="leading", steps_offset=1, clip_sample=False,
                                     set_alpha_to_one=False)


def image_to_tensor(image, image_processor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] from a PIL image (or a list of them) or a tensor in [-1, 1]; H and W must be
    multiples of 8."""
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image and all(isinstance(i, PIL.Image.Image) for i in image):
        sizes = {i.size for i in image}
        if len(sizes) != 1:
            raise ValueError(f"image: all images must have the same size, got {sorted(sizes)}")
        width, height = image[0].size
        _check_size(height, width)
        return image_processor.preprocess([i.convert("RGB") for i in image], height=height, width=width)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a PIL image or a tensor in [-1, 1], got {type(image).__name__}")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image: a tensor must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
    _check_size(image.shape[2], image.shape[3])
    if not torch.isfinite(image).all() or image.min() < -1 or image.max() > 1:
        raise ValueError("image: a tensor's values must lie in [-1, 1]")
    return image.detach().float()


def _check_size(height: int, width: int) -> None:
    if height % 8 or width % 8 or height < 8 or width < 8:
        raise ValueError(f"image: height and width must be multiples of 8, got {height}x{width} (resize it first)")


def performed_steps(num_inference_steps: int, skip: float) -> int:
    """How many of the schedule's steps are run: all but the first ``int(skip * num_inference_steps)``."""
    return num_inference_steps - int(skip * num_inference_steps)


def noise_map(scheduler: DDIMScheduler, x_prev: torch.Tensor, x_t: torch.Tensor, t, noise_pred: torch.Tensor,
              eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise map z with which one DDIM step from ``x_t`` lands on ``x_prev``, and where it really lands.

    Returns (z, mu + sigma z): z = (x_prev - mu) / sigma with mu the step's mean and sigma = eta * its standard
    deviation; z = 0 where the step has no noise (then it lands on mu).
    """
    mu = scheduler.step(noise_pred, t, x_t, eta=eta, variance_noise=torch.zeros_like(x_t), return_dict=False)[0]
    prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    sigma = eta * float(scheduler._get_variance(int(t), prev_t)) ** 0.5
    if sigma == 0.0:
        return torch.zeros_like(x_t), mu
    z = (x_prev - mu) / sigma
    return z, mu + sigma * z


def generator_fingerprint(generator) -> bytes | None:
    """The state of a generator (or a list of them), None for None."""
    if generator is None:
        return None
    gens = generator if isinstance(generator, list) else [generator]
    return b"".join(g.get_state().cpu().numpy().tobytes() for g in gens)


def inversion_key(pixels: torch.Tensor, generator, *settings) -> str:
    """A digest of the image's content (on whatever device and dtype it is), the settings and the random stream."""
    content = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    described = json.dumps([*settings, list(pixels.shape)], sort_keys=True, default=str).encode()
    return hashlib.sha256(content + described + (generator_fingerprint(generator) or b"global")).hexdigest()


class InversionMixin:
    """:meth:`invert` for :class:`~sega.pipeline.SegaPipeline`: real images to edit, cached in
    ``self.inversion_cache``."""

    @torch.no_grad()
    def invert(
        self,
        image: PIL.Image.Image | list[PIL.Image.Image] | torch.Tensor,
        source_prompt: str = "",
        num_inference_steps: int = 50,
        skip: float = 0.15,
        source_guidance_scale: float = 3.5,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        stop: StopFlag | None = None,
        cross_attention_kwargs: dict | None = None,
        clip_skip: int | None = None,
    ) -> SegaInversion:
        r"""Invert a real image for editing (edit-friendly DDPM inversion, as LEDITS++ with DDIM).

        Then ``pipe(source_prompt, inversion=inv, concepts=[...], return_original=True)`` edits it; the image
        without edits is the input as the VAE sees it.

        Args:
            image: a PIL image (or a list of same-size images) or a tensor (3, H, W) / (B, 3, H, W) in [-1, 1];
                H and W multiples of 8 (resize first).
            source_prompt: a description of the image; "" for none. Guides the inversion with
                ``source_guidance_scale`` and is the prompt to edit with.
            num_inference_steps: steps of the whole schedule, >= 1, including the skipped ones (SD: 50).
            skip: in [0, 1): the share of the first (noisiest) steps skipped, i.e. how much of the image is
                kept: 0 inverts from pure noise (edits can change everything), 0.15 (default) to 0.3 keeps the
                layout. The edit runs ``num_inference_steps - int(skip * num_inference_steps)`` steps.
            source_guidance_scale: classifier-free guidance of ``source_prompt`` during inversion, >= 0
                (LEDITS++: 3.5; <= 1 uses the prompt's estimate alone). Edits use the same by default.
            generator: draws the independent noisy versions of the image; same generator state, same inversion.
            use_cache: read and fill ``inversion_cache``, keyed by the image content, every setting and the
                pipeline's ``weights_version`` (loading, fusing, scaling... a LoRA or a textual inversion, or
                assigning a component, changes it and clears the cache).
            callback_on_step_end: ``f(pipe, step, t, tensors)``, called after each inversion step (steps 0 to
                n-1 of the n performed ones, from the noisiest; none on a cache hit) with "latents", where that
                step lands, as diffusers' pipelines call it after a denoising step; its return value is ignored
                (an inversion's latents are fixed by the image). Raise in it to stop the inversion: nothing is
                returned or cached. Progress bars and stop buttons use it; an edit's total work is n inversion
                steps plus n denoising steps.
            callback_on_step_end_tensor_inputs: tensors passed to ``callback_on_step_end`` ("latents").
            stop: as in :meth:`__call__`: checked before every inversion step; once set, raises
                :class:`~sega.stopping.Stopped` and nothing is returned or cached.
            cross_attention_kwargs, clip_skip: as in :meth:`__call__` (``{"scale": s}`` scales the LoRAs); edit
                with the same values to reconstruct the image.

        Returns:
            :class:`~sega.inversion.SegaInversion` with the start latents, noise maps, ``cache_hit`` and the
            UNet calls/samples spent.
        """
        # 1. Check inputs
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if not 0 <= skip < 1:
            raise ValueError(f"skip must be in [0, 1), got {skip!r}")
        if not source_guidance_scale >= 0:
            raise ValueError(f"source_guidance_scale must be >= 0, got {source_guidance_scale!r}")
        if not isinstance(source_prompt, str):
            raise ValueError(f"source_prompt must be a string, got {type(source_prompt).__name__}")
        if set(callback_on_step_end_tensor_inputs) - {"latents"}:
            raise ValueError('callback_on_step_end_tensor_inputs of invert may only name "latents"')
        pixels = image_to_tensor(image, self.image_processor)
        device, dtype = self._execution_device, self.unet.dtype

        # 2. The cache: same pixels, settings, random stream and model placement, same inversion
        scheduler = inversion_scheduler(self.scheduler.config)
        key = inversion_key(pixels, generator, source_prompt, num_inference_steps, skip,
                            float(source_guidance_scale), str(device), str(dtype), dict(scheduler.config),
                            self.weights_version, cross_attention_kwargs, clip_skip)
        cached = self.inversion_cache.get(key) if use_cache and generator is not None else None
        if cached is not None:
            return dataclasses.replace(cached, cache_hit=True, unet_calls=0, unet_samples=0)

        # 3. Encode the image and the prompts (the unconditional one as a call without negative prompt has it).
        # The latents, noise maps and scheduler arithmetic stay in float32 (half precision would drift from the
        # image); the UNet runs in its dtype.
        x0 = self.encode_pixels(pixels).float()
        batch = x0.shape[0]
        do_cfg = source_guidance_scale > 1.0
        height, width = pixels.shape[-2:]
        prompts, negatives = self.check_inputs(source_prompt, None, height, width, num_inference_steps, None, ())
        embeddings = self.encode_prompts(prompts, negatives, batch, ConceptSettings.none(), height=height,
                                         width=width, clip_skip=clip_skip,
                                         lora_scale=(cross_attention_kwargs or {}).get("scale"))
        state = Denoising(scheduler=scheduler, timesteps=scheduler.timesteps, batch=batch,
                          guidance_scale=source_guidance_scale, embeddings=embeddings, momentum=torch.zeros_like(x0),
                          cross_attention_kwargs=cross_attention_kwargs)

        # 4. Timesteps: the whole schedule, of which the last n are performed
        scheduler.set_timesteps(num_inference_steps, device=device)
        n = performed_steps(num_inference_steps, skip)
        timesteps = scheduler.timesteps[-n:]

        # 5. Independent noisy versions x_t of the image, drawn from the least noisy up (as LEDITS++)
        xts = [None] * n
        for k in reversed(range(n)):
            noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=x0.dtype)
            xts[k] = scheduler.add_noise(x0, noise, timesteps[k : k + 1].long())
        xts.append(x0)

        # 6. Noise maps, from the noisiest step down; each step's landing point is the next step's input
        zs = []
        segments = ["u", "p"] if do_cfg else ["p"]
        for k, t in enumerate(self.progress_bar(timesteps)):
            check_stop(stop, k, n, stage="inversion")
            chunks = self.unet_batch(state, t, [(scheduler.scale_model_input(xts[k], t), segments)])
            noise_pred = chunks[0]
            if do_cfg:
                noise_pred = noise_pred + classifier_free_guidance(chunks[0], chunks[1], source_guidance_scale)
            z, xts[k + 1] = noise_map(scheduler, xts[k + 1], xts[k], t, noise_pred)
            zs.append(z)
            if callback_on_step_end is not None:
                tensors = {"latents": xts[k + 1]}
                callback_on_step_end(self, k, t, {name: tensors[name] for name in callback_on_step_end_tensor_inputs})

        inversion = SegaInversion(
            latents=xts[0], noise_maps=torch.stack(zs), image_latents=x0, timesteps=timesteps, scheduler=scheduler,
            source_prompt=source_prompt, source_guidance_scale=float(source_guidance_scale),
            num_inference_steps=num_inference_steps, skip=float(skip), height=int(height), width=int(width),
            key=key, unet_calls=state.unet_calls, unet_samples=state.unet_samples,
        )
        if use_cache and generator is not None:
            self.inversion_cache.put(key, inversion)
        return inversion
