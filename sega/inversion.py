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

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler


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
        key: a digest of the image content and the settings (the re-edit cache's key for this source).
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
    return image.float()


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
