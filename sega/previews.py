"""Cheap previews of a run in progress: the clean image that a step's estimate predicts, as RGB.

At step t the model input is z_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (a_t the scheduler's cumulative alpha; the
schedulers that keep their latents in sigma units, such as Euler, divide them by sqrt(sigma^2 + 1) for the
model, which gives the same form), so an estimate predicts the clean latents

    eps-prediction:  x0 = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    v-prediction:    x0 = sqrt(a_t) z_t - sqrt(1 - a_t) v

and a preview shows x0 either through the model's VAE (exact, costs a decoder call) or through a linear map of
the latent channels to R, G, B (no network at all), as ComfyUI's latent previews do for Stable Diffusion 1.x:
the factors are ComfyUI's ``latent_rgb_factors`` of ``SD15`` in ``comfy/latent_formats.py``
(https://github.com/comfyanonymous/ComfyUI), one row per latent channel, one column per R, G, B, applied to the
scaled latents (the pipeline's own), the result clamped to [-1, 1].
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

# ComfyUI comfy/latent_formats.py, class SD15: latent_rgb_factors (rows: latent channels; columns: R, G, B).
SD15_LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
# ComfyUI comfy/latent_formats.py, class SDXL: latent_rgb_factors and latent_rgb_factors_bias.
SDXL_LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS: tuple[float, float, float] = (0.1084, -0.0175, -0.0011)
# ComfyUI comfy/latent_formats.py, class Flux (Comfy-Org/ComfyUI a125cd84): latent_rgb_factors and
# latent_rgb_factors_bias, for FLUX.1's 16-channel latents as the pipeline keeps them ((z - shift) * scale, which
# is ComfyUI's process_in), unpacked to (B, 16, H, W): SegaFluxPipeline's "pred_original_sample".
FLUX_LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS: tuple[float, float, float] = (-0.0329, -0.0718, -0.0851)


def predicted_original(model_input: torch.Tensor, estimate: torch.Tensor, alpha_prod,
                       prediction_type: str = "epsilon") -> torch.Tensor:
    """The clean latents x0 that ``estimate`` predicts from ``model_input`` at cumulative alpha ``alpha_prod``.

    Args:
        model_input: (B, ch, h, w) the UNet's input z_t (after the scheduler's ``scale_model_input``).
        estimate: (B, ch, h, w) the (guided) estimate: noise for "epsilon", velocity for "v_prediction".
        alpha_prod: a_t in (0, 1], a float or a 0-d tensor.
        prediction_type: "epsilon" or "v_prediction" (the scheduler config's ``prediction_type``).
    """
    a = torch.as_tensor(alpha_prod, dtype=torch.float32).to(model_input.device)
    z, e = model_input.float(), estimate.float()
    if prediction_type == "v_prediction":
        return a.sqrt() * z - (1 - a).sqrt() * e
    if prediction_type != "epsilon":
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    return (z - (1 - a).sqrt() * e) / a.sqrt()


def latent_rgb(latents: torch.Tensor, factors=SD15_LATENT_RGB_FACTORS, bias=None) -> torch.Tensor:
    """(B, 3, h, w) in [-1, 1]: each pixel's latent channels times ``factors`` (channels x RGB), plus ``bias``
    (RGB) if given, clamped."""
    weights = torch.as_tensor(factors, dtype=torch.float32, device=latents.device)
    if weights.shape != (latents.shape[1], 3):
        raise ValueError(f"factors must be ({latents.shape[1]}, 3) for {latents.shape[1]} latent channels, "
                         f"got {tuple(weights.shape)}")
    rgb = torch.einsum("bchw,cr->brhw", latents.float(), weights)
    if bias is not None:
        rgb = rgb + torch.as_tensor(bias, dtype=torch.float32, device=latents.device)[None, :, None, None]
    return rgb.clamp(-1, 1)


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """RGB images (B, 3, h, w) in [-1, 1] as PIL images."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [PIL.Image.fromarray(np.ascontiguousarray(a)) for a in array]


@torch.no_grad()
def preview_images(latents: torch.Tensor, vae=None, factors=SD15_LATENT_RGB_FACTORS,
                   bias=None) -> list[PIL.Image.Image]:
    """Previews of clean latents x0: through ``vae`` (an AutoencoderKL: exact, for small models) or, without
    one, through ``factors`` and ``bias`` (default SD 1.5's; SDXL: :data:`SDXL_LATENT_RGB_FACTORS` and
    :data:`SDXL_LATENT_RGB_BIAS`; FLUX: :data:`FLUX_LATENT_RGB_FACTORS` and :data:`FLUX_LATENT_RGB_BIAS`), a
    picture at latent resolution, 1/8 of the image's side."""
    if vae is None:
        return to_pil(latent_rgb(latents, factors, bias))
    decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return to_pil(decoded)
