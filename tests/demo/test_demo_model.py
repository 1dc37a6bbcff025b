"""The bundled demo model: loads offline, follows prompts, and SEGA edits of every kind visibly work on it."""

import pytest
import torch

from sega.demo.evaluate import EDIT_KINDS, Evaluator, load
from sega.demo.presets import DEMO_PRESETS
from sega.demo.shapes import DEFAULT_MODEL_DIR

# Seeds 900-907 are used by no sweep (tuning seeds are 0-899) or published figure (evaluation seeds from 1000);
# with the evaluation's cycling they cover both directions of background and size, all six shape pairs and
# eight of the twelve colour pairs. The floors sit below the model card's figures to allow for 8 seeds; an
# untrained or broken model, or presets that stop working, score near 0 on each.
SEEDS = list(range(900, 908))
PROMPT_FLOOR = 0.75
EDIT_FLOOR = {"color": 0.75, "background": 0.75, "shape": 0.5, "size": 0.75, "removal": 0.75, "three": 0.5}
IOU_FLOOR = 0.7


@pytest.fixture(scope="module")
def evaluator():
    if not (DEFAULT_MODEL_DIR / "model_index.json").exists():
        pytest.fail(f"the bundled model is missing at {DEFAULT_MODEL_DIR}")
    return Evaluator(load(DEFAULT_MODEL_DIR))


@pytest.fixture(scope="module")
def colour_swaps(evaluator):
    return evaluator.edits("color", SEEDS, DEMO_PRESETS)


def test_loads_offline_from_the_bundled_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load(DEFAULT_MODEL_DIR)
    assert pipe.unet.dtype == torch.float32
    assert pipe.tokenizer.unk_token_id not in pipe.tokenizer("a small red circle on a white background").input_ids


def test_prompt_accuracy_floor(evaluator):
    assert evaluator.prompt_accuracy(SEEDS) >= PROMPT_FLOOR


@pytest.mark.parametrize("kind", [k for k in EDIT_KINDS if k != "color"])
def test_edit_success_floor(evaluator, kind):
    result = evaluator.edits(kind, SEEDS, DEMO_PRESETS)
    assert result["success"] >= EDIT_FLOOR[kind], result["directions"]


def test_colour_swap_works_and_keeps_the_composition(colour_swaps):
    assert colour_swaps["success"] >= EDIT_FLOOR["color"], colour_swaps["directions"]
    assert colour_swaps["iou_sega"] >= IOU_FLOOR
    assert colour_swaps["iou_sega"] > colour_swaps["iou_prompt_change"]


def test_every_kind_has_a_preset_and_examples_use_known_presets():
    from sega.demo.evaluate import KIND_PRESETS
    from sega.demo.presets import DEMO_EXAMPLES

    assert {p for names in KIND_PRESETS.values() for p in names} <= set(DEMO_PRESETS)
    for _, _, concepts, _ in DEMO_EXAMPLES:
        assert all(c["preset"] in DEMO_PRESETS for c in concepts)


def test_presets_for_masks_have_the_same_names():
    """The app's rows keep their preset when the mask mode changes: every table names the same presets."""
    from sega.demo.presets import DEMO_EDIT_MASK_PRESETS, DEMO_EDIT_PRESETS, DEMO_MASK_PRESETS

    assert set(DEMO_MASK_PRESETS) == set(DEMO_PRESETS) and set(DEMO_EDIT_MASK_PRESETS) == set(DEMO_EDIT_PRESETS)
    assert DEMO_MASK_PRESETS != DEMO_PRESETS and DEMO_EDIT_MASK_PRESETS != DEMO_EDIT_PRESETS
