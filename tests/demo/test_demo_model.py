"""The bundled demo model: loads offline, follows prompts, and SEGA edits visibly work on it."""

import pytest
import torch

from sega.demo.evaluate import Evaluator, load
from sega.demo.presets import DEMO_PRESETS
from sega.demo.shapes import DEFAULT_MODEL_DIR

# Seeds 900-907 are used by no sweep or published evaluation figure. The floors sit below the model card's
# figures (prompt accuracy 92%, edits per kind 29-100%, colour-swap IoU 0.75) to allow for 8 seeds;
# an untrained or broken model scores near 0 on each.
SEEDS = list(range(900, 908))
PROMPT_FLOOR = 0.75
EDIT_FLOOR = {"color": 0.75, "background": 0.5, "shape": 0.5, "removal": 0.25}
IOU_FLOOR = 0.6


@pytest.fixture(scope="module")
def evaluator():
    if not (DEFAULT_MODEL_DIR / "model_index.json").exists():
        pytest.fail(f"the bundled model is missing at {DEFAULT_MODEL_DIR}")
    return Evaluator(load(DEFAULT_MODEL_DIR))


def test_loads_offline_from_the_bundled_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load(DEFAULT_MODEL_DIR)
    assert pipe.unet.dtype == torch.float32
    assert pipe.tokenizer.unk_token_id not in pipe.tokenizer("a small red circle on a white background").input_ids


def test_prompt_accuracy_floor(evaluator):
    assert evaluator.prompt_accuracy(SEEDS) >= PROMPT_FLOOR


@pytest.mark.parametrize("kind", ["color", "background", "shape", "removal"])
def test_edit_success_floor(evaluator, kind):
    assert evaluator.edits(kind, SEEDS, DEMO_PRESETS)["success"] >= EDIT_FLOOR[kind]


def test_colour_swap_keeps_the_composition(evaluator):
    r = evaluator.edits("color", SEEDS, DEMO_PRESETS)
    assert r["iou_sega"] >= IOU_FLOOR
    assert r["iou_sega"] > r["iou_prompt_change"]
