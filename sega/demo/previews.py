"""Live previews of the demo model without its VAE: a linear map of its 4 latent channels to R, G, B.

ComfyUI previews Stable Diffusion's latents with factors fitted to SD's VAE (``sega.previews``); the demo model
has its own VAE, so its factors are fitted the same way, by least squares from its scaled latents to its
decoded images pooled to latent resolution, on images drawn by its renderer. A decode through the demo VAE
costs about half a call of its UNet, which would slow a run with ten previews by half; this map costs nothing.
``python -m sega.demo fit-previews`` refits them (the test suite checks that these are a fit of the bundled VAE).
"""

from __future__ import annotations

import numpy as np
import torch

from .shapes import random_spec, render

# `python -m sega.demo fit-previews` (600 images, seed 0; held-out RMS error 0.40, colours' spread 0.84); rows: latent channels, columns: R, G, B.
DEMO_LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (0.4327, 0.0786, 0.4305),
    (0.2121, 0.4074, 0.2365),
    (-0.6990, -0.7611, -0.3528),
    (0.1414, 0.1161, 0.2625),
)
DEMO_LATENT_RGB_BIAS: tuple[float, float, float] = (-0.2379, -0.0877, -0.1531)


@torch.no_grad()
def latents_and_targets(vae, images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latents (N, 4) and their decoded colours pooled to latent resolution (N, 3), per latent pixel, for
    ``images`` renderer images."""
    rng = np.random.default_rng(seed)
    pixels = torch.from_numpy(np.stack([render(random_spec(rng), rng) for _ in range(images)])).float()
    x = pixels.permute(0, 3, 1, 2) / 127.5 - 1
    latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    decoded = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    pooled = torch.nn.functional.avg_pool2d(decoded, x.shape[-1] // latents.shape[-1])
    return latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]), pooled.permute(0, 2, 3, 1).reshape(-1, 3)


def fit_latent_rgb(vae, images: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``(factors (channels, 3), bias (3,))`` from scaled latents to pooled decoded RGB."""
    latents, targets = latents_and_targets(vae, images, seed)
    design = torch.cat([latents, torch.ones(len(latents), 1)], dim=1)
    solution = torch.linalg.lstsq(design, targets).solution
    return solution[:-1], solution[-1]


def map_error(vae, factors, bias, images: int = 100, seed: int = 1) -> tuple[float, float]:
    """``(RMS error of the map, RMS spread of the colours)`` on other images than the fit's, in [-1, 1] units."""
    latents, targets = latents_and_targets(vae, images, seed)
    mapped = (latents @ torch.as_tensor(factors) + torch.as_tensor(bias)).clamp(-1, 1)
    return float((mapped - targets).pow(2).mean().sqrt()), float(targets.std())
