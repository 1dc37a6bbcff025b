"""Live previews (sega/previews.py) on plain tensors, and the pipeline's predicted clean latents."""

import pytest
import torch

from sega import SegaPipeline
from sega.previews import SD15_LATENT_RGB_FACTORS, latent_rgb, predicted_original, preview_images, to_pil
from tests.tiny import tiny_components


def test_latent_rgb_is_comfyuis_sd15_linear_map_clamped():
    latents = torch.zeros(1, 4, 2, 3)
    latents[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # channel 0 alone: its row of factors
    latents[0, :, 0, 1] = torch.tensor([0.5, -1.0, 2.0, 0.25])
    latents[0, :, 1, 2] = torch.tensor([4.0, 4.0, 0.0, 0.0])  # far beyond the range: clamped
    rgb = latent_rgb(latents)
    assert rgb.shape == (1, 3, 2, 3)
    torch.testing.assert_close(rgb[0, :, 0, 0], torch.tensor([0.3512, 0.2297, 0.3227]))
    mixed = [sum(w * SD15_LATENT_RGB_FACTORS[c][k] for c, w in enumerate([0.5, -1.0, 2.0, 0.25])) for k in range(3)]
    torch.testing.assert_close(rgb[0, :, 0, 1], torch.tensor(mixed).clamp(-1, 1))
    assert rgb[0, :, 1, 2].tolist() == [1.0, 1.0, 1.0]
    assert rgb[0, :, 1, 0].tolist() == [0.0, 0.0, 0.0]  # zero latents are mid-grey
    with pytest.raises(ValueError, match="factors"):
        latent_rgb(torch.zeros(1, 3, 2, 2))


def test_to_pil_maps_minus_one_to_black_and_one_to_white():
    images = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 3, 1, 1).expand(1, 3, 2, 2)
    (image,) = to_pil(images)
    assert image.size == (2, 2) and image.mode == "RGB" and image.getpixel((0, 0)) == (0, 128, 255)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_original_inverts_the_forward_process(prediction_type):
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    a = torch.tensor(0.3)
    z = a.sqrt() * x0 + (1 - a).sqrt() * eps
    estimate = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0  # v = sqrt(a) e - sqrt(1-a) x0
    torch.testing.assert_close(predicted_original(z, estimate, a, prediction_type), x0)
    with pytest.raises(ValueError, match="prediction_type"):
        predicted_original(z, eps, a, "sample")


def test_the_pipeline_hands_its_step_callback_the_predicted_clean_latents():
    pipe = SegaPipeline(**tiny_components("ddim"))
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def on_step(_pipe, i, t, tensors):
        seen.append(tensors["pred_original_sample"])
        return {}

    out = pipe("a red circle", num_inference_steps=4, guidance_scale=3.0, output_type="latent",
               generator=torch.Generator().manual_seed(1), callback_on_step_end=on_step,
               callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"])
    assert len(seen) == 4 and seen[0].shape == out.images.shape
    # DDIM's last step lands on its x0 prediction (alpha of the step after the last is 1 for set_alpha_to_one)
    # or close to it; the first prediction is far from the end, the last one close
    assert (seen[-1] - out.images).abs().max() < (seen[0] - out.images).abs().max()
    images = preview_images(seen[-1], pipe.vae)
    side = 8 * pipe.vae_scale_factor  # the tiny VAE's images
    assert len(images) == 1 and images[0].size == (side, side)
    assert preview_images(seen[-1])[0].size == (8, 8)  # the linear map: latent resolution


def test_sdxl_previews_add_comfyuis_bias():
    from sega.previews import SDXL_LATENT_RGB_BIAS, SDXL_LATENT_RGB_FACTORS

    zeros = torch.zeros(1, 4, 2, 2)
    rgb = latent_rgb(zeros, SDXL_LATENT_RGB_FACTORS, SDXL_LATENT_RGB_BIAS)
    torch.testing.assert_close(rgb[0, :, 0, 0], torch.tensor(SDXL_LATENT_RGB_BIAS))
    one = torch.zeros(1, 4, 1, 1)
    one[0, 0] = 1.0  # the first channel alone: its row of factors plus the bias
    want = torch.tensor(SDXL_LATENT_RGB_FACTORS[0]) + torch.tensor(SDXL_LATENT_RGB_BIAS)
    torch.testing.assert_close(latent_rgb(one, SDXL_LATENT_RGB_FACTORS, SDXL_LATENT_RGB_BIAS)[0, :, 0, 0], want)
