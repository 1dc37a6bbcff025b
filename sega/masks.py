"""Implicit masks for semantic guidance, as small pure functions on tensors: no models, no I/O.

LEDITS++ (Brack, Friedrich, Kornmeier, Tsaban, Schramowski, Kersting and Passos, "LEDITS++: Limitless Image
Editing using Text-to-Image Models", CVPR 2024, arXiv 2311.16711) restricts each concept's edit to where the
concept is, instead of SEGA's per-channel threshold. diffusers ships it inside
``LEditsPPPipelineStableDiffusion`` (``pipeline_leditspp_stable_diffusion.py``); these functions compute the
same masks, for any SEGA call:

- cross-attention mask: the concept's tokens' cross-attention map at a quarter of the latent size (heads and
  layers averaged, the concept's own tokens summed; see :mod:`sega.attention`), smoothed with a 3x3 Gaussian,
  kept where it reaches its ``threshold`` quantile, nearest-neighbour upsampled to the latent size;
- noise mask: |psi| summed over the latent channels, kept where it reaches its ``threshold`` quantile (one
  mask for every channel, unlike SEGA's threshold, which ranks each channel on its own);
- intersect mask: noise mask x cross-attention mask; while t > 0.8 T (SD: t > 800) the cross-attention mask
  alone, as diffusers does.

With a mask, the mask replaces SEGA's threshold: psi_c = s_c (+-1) (e_c - e_u) [x user mask] x mask_c.
Without one (``user_mask`` alone), SEGA's per-channel threshold applies to the user-masked psi.

Shapes: C concepts, B images, latents (B, ch, H, W); concept estimates (C, B, ch, H, W); attention maps
(C, B, h, w); masks (C, B, H, W) with 1.0 where the edit is kept and 0.0 elsewhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .guidance import keep_top_per_channel, quantile_per_row

# The mask modes a caller (the app's "mask" parameter, the demo evaluation) names, as SegaPipeline keywords.
MASK_MODES: dict[str, dict[str, bool]] = {
    "none": {},
    "cross-attention": {"use_cross_attn_mask": True},
    "intersect": {"use_intersect_mask": True},
}

# LEDITS++ applies the cross-attention mask alone above this share of the training timesteps (SD: t > 800).
NOISE_MASK_MAX_TIMESTEP_SHARE = 0.8


def attention_resolution(height: int, width: int) -> tuple[int, int]:
    """The size of the UNet's feature maps two downsamplings below a (height, width) latent.

    A diffusers downsampler (3x3 convolution, stride 2, padding 1) maps n to ceil(n / 2), so a latent that is
    not a multiple of 4 still has a well-defined quarter-size layer (diffusers' LEDITS++ compares query
    lengths with (H / 4) * (W / 4) instead, and finds no map at such sizes).
    """
    return math.ceil(math.ceil(height / 2) / 2), math.ceil(math.ceil(width / 2) / 2)


def gaussian_kernel_3x3(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """LEDITS++'s 3x3 smoothing kernel (sigma 0.5 as diffusers writes it, exp(-((x - mean) / (2 sigma))^2)),
    normalised to sum 1: per axis about 0.2119 / 0.5761 / 0.2119. Shape (1, 1, 3, 3)."""
    grid = torch.meshgrid([torch.arange(3, dtype=torch.float32)] * 2, indexing="ij")
    kernel = 1
    for axis in grid:
        kernel = kernel * (1 / (0.5 * math.sqrt(2 * math.pi)) * torch.exp(-(((axis - 1) / (2 * 0.5)) ** 2)))
    kernel = kernel / torch.sum(kernel)
    return kernel.view(1, 1, 3, 3).to(device=device, dtype=dtype)


def gaussian_smoothing(maps: torch.Tensor) -> torch.Tensor:
    """Smooth (..., h, w) maps with :func:`gaussian_kernel_3x3` after reflect-padding by 1 (replicate along a
    side of length 1, where reflection is undefined). Same shape and dtype."""
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    x = maps.reshape(-1, 1, h, w)
    mode = "reflect" if min(h, w) > 1 else "replicate"
    x = F.pad(x, (1, 1, 1, 1), mode=mode)
    return F.conv2d(x, gaussian_kernel_3x3(maps.dtype, maps.device)).reshape(*lead, h, w)


def quantile_mask(values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """1.0 where ``values`` (C, B, h, w) reach the ``thresholds[c]`` quantile of their (c, b) map, else 0.0.

    The quantile is torch.quantile's (linear interpolation, float32), compared in ``values``' dtype.
    """
    q = quantile_per_row(values.flatten(start_dim=2), thresholds).to(values.dtype)
    return (values >= q[..., None, None]).to(values.dtype)


def upsample_nearest(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (..., h, w) masks to (..., *size), as ``F.interpolate``'s default mode."""
    lead, (h, w) = masks.shape[:-2], masks.shape[-2:]
    return F.interpolate(masks.reshape(-1, 1, h, w), size=tuple(size), mode="nearest").reshape(*lead, *size)


def cross_attention_mask(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, B, h, w) attention maps -> (C, B, *size) masks: smoothed, thresholded at the quantile, upsampled."""
    return upsample_nearest(quantile_mask(gaussian_smoothing(maps), thresholds), size)


def noise_mask(psi: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(C, B, ch, H, W) directions -> (C, B, H, W): |psi| summed over channels, kept at its quantile."""
    return quantile_mask(psi.abs().sum(dim=2), thresholds)


def intersect_mask(noise: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Where the concept pulls hard *and* attends: the product of a noise and a cross-attention mask."""
    return noise * attention


def noise_mask_applies(timestep, num_train_timesteps: int) -> bool:
    """Whether the intersect mask uses the noise mask at ``timestep`` (LEDITS++: t <= 800 of 1000)."""
    return float(timestep) <= NOISE_MASK_MAX_TIMESTEP_SHARE * num_train_timesteps


def masked_concept_directions(
    noise_uncond: torch.Tensor,
    noise_concepts: torch.Tensor,
    signed_scales: torch.Tensor,
    thresholds: torch.Tensor,
    attention_maps: torch.Tensor | None = None,
    user_mask: torch.Tensor | None = None,
    intersect: bool = False,
    use_noise_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concept directions restricted by masks, in LEDITS++'s order.

    psi_c = s_c (+-1) (e_c - e_u); times ``user_mask``; then, with ``attention_maps``, times the
    cross-attention mask (or, with ``intersect`` and ``use_noise_mask``, the intersect mask); without
    ``attention_maps``, SEGA's per-channel threshold (:func:`~sega.guidance.keep_top_per_channel`).

    Args:
        noise_uncond: (B, ch, H, W) unconditional estimate e_u.
        noise_concepts: (C, B, ch, H, W) concept estimates e_c.
        signed_scales: (C,) edit scales, negated for concepts to remove.
        thresholds: (C,) quantiles in [0, 1): of the attention map (and of the noise magnitude with
            ``intersect``), or SEGA's per-channel threshold without attention maps.
        attention_maps: (C, B, h, w) each concept's cross-attention map, or None for no implicit mask.
        user_mask: (B, 1, H, W) or broadcastable, values in [0, 1], multiplied in before the quantiles.
        intersect: intersect the cross-attention mask with the noise mask.
        use_noise_mask: False while t > 800 (SD): the intersect mask is then the cross-attention mask alone.

    Returns:
        (psi (C, B, ch, H, W), the implicit mask (C, B, H, W) or None without ``attention_maps``).
        The mask excludes ``user_mask``, as diffusers' ``activation_mask`` does.
    """
    c = noise_concepts.shape[0]
    psi = (noise_concepts - noise_uncond.unsqueeze(0)) * signed_scales.reshape(c, 1, 1, 1, 1).to(noise_concepts.dtype)
    if user_mask is not None:
        psi = psi * user_mask.to(psi.dtype)
    if attention_maps is None:
        return keep_top_per_channel(psi, thresholds), None
    mask = cross_attention_mask(attention_maps, thresholds, psi.shape[-2:]).to(psi.dtype)
    if intersect and use_noise_mask:
        mask = intersect_mask(noise_mask(psi, thresholds), mask)
    return psi * mask.unsqueeze(2), mask


def mean_masks(edit_masks: torch.Tensor, warmup: list[int], cooldown: list[int | None]) -> torch.Tensor:
    """Per concept, its mask averaged over the steps at which its edit is applied ([warmup, cooldown)):
    (steps, C, B, H, W) -> (C, B, H, W), in [0, 1] (zeros for a concept never applied)."""
    steps = edit_masks.shape[0]
    out = torch.zeros_like(edit_masks[0])
    for c, (start, stop) in enumerate(zip(warmup, cooldown)):
        end = steps if stop is None else min(stop, steps)
        if start < end:
            out[c] = edit_masks[start:end, c].float().mean(dim=0).to(out.dtype)
    return out


def latent_user_mask(mask, batch: int, latent_size: tuple[int, int], image_size: tuple[int, int],
                     device=None, dtype=torch.float32) -> torch.Tensor:
    """A user's mask as (batch, 1, H, W) at the latent size, checked.

    Accepts a tensor or array of shape (H, W), (B, H, W) or (B, 1, H, W) at the latent size or at the image
    size (area-averaged down to the latent size, so the mask stays in [0, 1]), or a PIL image (white = edit)
    or a list of one per image. B is 1 (every image) or the batch. Values must be finite, in [0, 1].
    """
    import numpy as np
    import PIL.Image

    allowed = (f"user_mask must be a mask in [0, 1] of shape (H, W), (B, H, W) or (B, 1, H, W) with (H, W) the "
               f"latent size {tuple(latent_size)} or the image size {tuple(image_size)} and B 1 or {batch}")
    if isinstance(mask, PIL.Image.Image):
        mask = [mask]
    if isinstance(mask, (list, tuple)):
        if not all(isinstance(m, PIL.Image.Image) for m in mask):
            raise ValueError(f"{allowed}; a list must hold PIL images")
        mask = np.stack([np.asarray(m.convert("L"), dtype=np.float32) / 255.0 for m in mask])
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.asarray(mask, dtype=np.float32))
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{allowed}; got {type(mask).__name__}")
    m = mask.detach().to("cpu", torch.float32)
    if m.dim() == 2:
        m = m[None, None]
    elif m.dim() == 3:
        m = m[:, None]
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[0] not in (1, batch):
        raise ValueError(f"{allowed}; got shape {tuple(mask.shape)}")
    size = tuple(m.shape[-2:])
    if size == tuple(image_size) and size != tuple(latent_size):
        m = F.adaptive_avg_pool2d(m, tuple(latent_size))
    elif size != tuple(latent_size):
        raise ValueError(f"{allowed}; got shape {tuple(mask.shape)}")
    if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise ValueError(f"{allowed}; got values in [{m.min().item():g}, {m.max().item():g}]")
    return m.expand(batch, -1, -1, -1).to(device=device, dtype=dtype)
