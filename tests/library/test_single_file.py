"""``SegaPipeline.from_single_file`` (diffusers' ``FromSingleFileMixin``) against StableDiffusionPipeline's, offline.

The tiny components are saved as a diffusers folder and converted to ONE original (LDM) checkpoint
(tests/single_file.py, after diffusers' conversion script). ``from_single_file(file, config=...)`` takes the
weights from the file and everything else (configs, the word-level tokenizer, the scheduler) from a config folder,
which here holds no weights at all, so a component that silently fell back to the folder's weights would fail.
"""

import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import save_file

from sega import EditConcept, SegaPipeline
from tests.single_file import to_single_file
from tests.tiny import tiny_components

TOL = 1e-4
STEPS = 3
PROMPT = "a red circle"


def latents(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(0),
                **kw).images


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(diffusers folder, config folder without weights, single-file checkpoint)."""
    root = tmp_path_factory.mktemp("single_file")
    parts = tiny_components("ddim")
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder, config = root / "diffusers", root / "config"
    pipe.save_pretrained(folder)
    shutil.copytree(folder, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    checkpoint = to_single_file(pipe.unet, pipe.vae, pipe.text_encoder)
    # The conversion is the exact inverse of diffusers' (which from_single_file applies).
    for model, back in ((pipe.unet, convert_ldm_unet_checkpoint(checkpoint, pipe.unet.config)),
                        (pipe.vae, convert_ldm_vae_checkpoint(checkpoint, pipe.vae.config))):
        state = model.state_dict()
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], v) for k, v in state.items())
    file = root / "tiny-sd.safetensors"
    save_file(checkpoint, str(file))
    return folder, config, file


def test_from_single_file_matches_diffusers(saved):
    folder, config, file = saved
    kw = dict(config=str(config), local_files_only=True)
    ref = StableDiffusionPipeline.from_single_file(str(file), **kw)
    ours = SegaPipeline.from_single_file(str(file), **kw)
    assert type(ours) is SegaPipeline and type(ref) is StableDiffusionPipeline
    assert ours.safety_checker is None and ours.feature_extractor is None
    want = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        state = getattr(want, name).state_dict()
        for pipe in (ours, ref):
            got = getattr(pipe, name).state_dict()
            assert got.keys() == state.keys()
            assert all(torch.equal(got[k], v) for k, v in state.items()), name
    assert ours.tokenizer(PROMPT).input_ids == want.tokenizer(PROMPT).input_ids

    expected = latents(want)
    torch.testing.assert_close(latents(ref), expected, rtol=0, atol=TOL)
    torch.testing.assert_close(latents(ours), expected, rtol=0, atol=TOL)

    edited = latents(ours, concepts=[EditConcept("blue", warmup=0)])
    assert torch.isfinite(edited).all() and edited.shape == expected.shape
    assert (edited - expected).abs().max() > 1e-3
