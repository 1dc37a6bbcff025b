"""The demo model's dataset, attribute reader and training script."""

import itertools
import json

import numpy as np
import pytest
import torch

from sega.demo.shapes import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SIZES,
    ShapeSpec,
    describe,
    edit_training_caption,
    mask_iou,
    partial_caption,
    render,
    training_caption,
)


@pytest.mark.parametrize("size,color,shape,background",
                         list(itertools.product(SIZES, COLORS, SHAPES, BACKGROUNDS)))
def test_describe_reads_rendered_attributes(size, color, shape, background):
    rng = np.random.default_rng(hash((size, color, shape, background)) % 2**32)
    spec = ShapeSpec(size, color, shape, background)
    for _ in range(5):
        image = render(spec, rng)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert describe(image).attributes() == vars(spec)


def test_geometry_follows_the_spec():
    rng = np.random.default_rng(0)
    for _ in range(50):
        spec = ShapeSpec("small" if rng.random() < 0.5 else "large", "red", "square", "white")
        d = describe(render(spec, rng))
        ys, xs = np.nonzero(d.mask)
        extent = (xs.max() - xs.min() + 1) / 32
        lo, hi = (0.25, 0.45) if spec.size == "small" else (0.55, 0.80)
        assert lo - 0.05 <= extent <= hi + 0.05
    # The position is random: the same caption gives different compositions.
    a = describe(render(ShapeSpec("small", "red", "circle", "white"), rng)).mask
    b = describe(render(ShapeSpec("small", "red", "circle", "white"), rng)).mask
    assert mask_iou(a, b) < 1.0


def test_captions_follow_the_grammar():
    spec = ShapeSpec("large", "blue", "circle", "black")
    assert spec.caption() == "a large blue circle on a black background"
    keep = dict(size=False, color=True, shape=True, background=False)
    assert partial_caption(spec, keep) == "a blue circle"
    assert partial_caption(spec, dict(size=False, color=True, shape=False, background=False)) == "blue"
    assert partial_caption(spec, dict(size=False, color=False, shape=False, background=True)) == "on a black background"
    assert partial_caption(spec, dict(size=False, color=False, shape=False, background=True),
                           bare_background=True) == "black background"
    rng = np.random.default_rng(0)
    caps = [training_caption(spec, rng) for _ in range(2000)]
    assert 0.07 < caps.count("") / len(caps) < 0.13  # about 10% empty for classifier-free guidance
    assert 0.3 < caps.count(spec.caption()) / len(caps) < 0.5
    vocab = {"a", "on", "background", "large", "blue", "circle", "black"}
    assert all(set(c.split()) <= vocab for c in caps)


def test_training_script_runs_and_saves_a_loadable_model(tmp_path, monkeypatch):
    from sega import EditConcept, SegaPipeline
    from sega.demo.train import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = train(tmp_path / "m", vae_steps=2, unet_steps=2, batch_size=4, log_every=1)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").exists()
    pipe = SegaPipeline.from_pretrained(out, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    res = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               concepts=[EditConcept("blue", warmup=0)], return_original=True)
    assert res.images[0].size == (32, 32) and res.original_images[0].size == (32, 32)


def test_edit_caption_mix_teaches_each_attribute_alone():
    spec = ShapeSpec("large", "blue", "circle", "black")
    rng = np.random.default_rng(0)
    caps = [edit_training_caption(spec, rng) for _ in range(4000)]
    assert 0.07 < caps.count("") / len(caps) < 0.13
    assert 0.25 < caps.count(spec.caption()) / len(caps) < 0.35
    singles = {"large", "blue", "a circle", "black background", "on a black background"}
    share = sum(c in singles for c in caps) / len(caps)
    assert 0.25 < share < 0.35  # one attribute alone, the meaning of a single SEGA concept
    assert caps.count("blue") > 0.05 * len(caps)
    vocab = {"a", "on", "background", "large", "blue", "circle", "black"}
    assert all(set(c.split()) <= vocab for c in caps)


def test_training_resumes_from_its_last_checkpoint(tmp_path, capsys):
    from sega.demo.train import train

    kw = dict(vae_steps=2, batch_size=4, log_every=1, work_dir=tmp_path / "work", checkpoint_every=1,
              caption_mix="edit", decoder_steps=1, warmup_steps=1)
    train(tmp_path / "m", unet_steps=2, **kw)
    assert (tmp_path / "work" / "state.pt").exists()
    capsys.readouterr()
    out = train(tmp_path / "m", unet_steps=3, **kw)  # a restarted command goes on where the last one stopped
    log = capsys.readouterr().out
    assert "resumed" in log and "vae step" not in log and "decoder step" not in log
    assert "unet step     2" in log and "unet step     0" not in log
    info = json.loads((out / "training.json").read_text())
    assert info["unet_steps"] == 3 and info["caption_mix"] == "edit" and info["decoder_steps"] == 1
