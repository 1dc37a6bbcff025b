"""Evaluation and preset sweep for the bundled shapes model (``python -m sega.demo eval|sweep``)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..concepts import EditConcept
from .presets import DEMO_DEFAULTS, DEMO_PRESETS
from .shapes import BACKGROUNDS, COLORS, SHAPES, SIZES, ShapeSpec, describe, mask_iou, random_spec

EDIT_KINDS = ("color", "background", "shape", "size", "removal", "three")


def load(model_dir: str | Path):
    from ..pipeline import SegaPipeline

    pipe = SegaPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_uint8(images: np.ndarray) -> list[np.ndarray]:
    return [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in images]


def spec_for_seed(seed: int) -> ShapeSpec:
    return random_spec(np.random.default_rng(seed))


def _other(values, current: str, seed: int) -> str:
    choices = [v for v in values if v != current]
    return choices[seed % len(choices)]


@dataclass
class EditCase:
    kind: str
    concepts: list[EditConcept]
    attribute: str | None  # the attribute that must change (None for removal)
    target: str | None  # its new value


def edit_case(kind: str, found: dict, seed: int, settings: dict[str, dict]) -> EditCase:
    """SEGA users' way of writing each edit: add the new value and remove the old one."""
    def swap(attr: str, values, preset: str, fmt=lambda v: v) -> EditCase:
        new = _other(values, found[attr], seed)
        s = settings[preset]
        return EditCase(kind, [EditConcept(fmt(new), **s), EditConcept(fmt(found[attr]), reverse=True, **s)], attr, new)

    if kind == "color":
        return swap("color", list(COLORS), "color")
    if kind == "background":
        return swap("background", list(BACKGROUNDS), "background", lambda v: f"{v} background")
    if kind == "shape":
        return swap("shape", SHAPES, "shape")
    if kind == "size":
        return swap("size", SIZES, "size")
    if kind == "removal":
        return EditCase(kind, [EditConcept(found["color"], reverse=True, **settings["color"])], None, found["color"])
    if kind == "three":
        case = swap("color", list(COLORS), "color")
        bg = _other(list(BACKGROUNDS), found["background"], seed)
        case.concepts.append(EditConcept(f"{bg} background", **settings["background"]))
        return EditCase(kind, case.concepts, "color+background", f"{case.target}+{bg}")
    raise ValueError(f"unknown edit kind {kind!r}")


def edit_succeeded(case: EditCase, before: dict, after: dict) -> bool:
    if after["shape"] is None:
        return False  # the shape vanished
    if case.kind == "removal":
        return after["color"] != case.target
    if case.kind == "three":
        color, bg = case.target.split("+")
        return after["color"] == color and after["background"] == bg
    return after[case.attribute] == case.target


class Evaluator:
    def __init__(self, pipe, steps: int | None = None, guidance_scale: float | None = None,
                 momentum_scale: float | None = None, momentum_beta: float | None = None):
        self.pipe = pipe
        self.steps = steps or DEMO_DEFAULTS["steps"]
        self.guidance_scale = guidance_scale or DEMO_DEFAULTS["guidance_scale"]
        self.momentum_scale = DEMO_DEFAULTS["momentum_scale"] if momentum_scale is None else momentum_scale
        self.momentum_beta = DEMO_DEFAULTS["momentum_beta"] if momentum_beta is None else momentum_beta

    def run(self, prompts: list[str], seeds: list[int], concepts=None):
        out = self.pipe(prompts, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np",
                        concepts=concepts, edit_momentum_scale=self.momentum_scale, edit_mom_beta=self.momentum_beta,
                        return_original=concepts is not None)
        edited = to_uint8(out.images)
        return (to_uint8(out.original_images) if concepts is not None else None), edited

    def plain(self, seeds: list[int]) -> tuple[list[ShapeSpec], list[dict], list[np.ndarray]]:
        specs = [spec_for_seed(s) for s in seeds]
        _, images = self.run([s.caption() for s in specs], seeds)
        return specs, [describe(im) for im in images], images

    def prompt_accuracy(self, seeds: list[int]) -> float:
        specs, found, _ = self.plain(seeds)
        return float(np.mean([d.attributes() == vars(s) for s, d in zip(specs, found)]))

    def edits(self, kind: str, seeds: list[int], settings: dict[str, dict]) -> dict:
        """Success rate of one edit kind; for colour swaps also the IoU against a changed prompt."""
        wins, ious, prompt_ious = [], [], []
        for seed in seeds:
            spec = spec_for_seed(seed)
            _, base = self.run([spec.caption()], [seed])
            before = describe(base[0])
            if before.shape is None:
                wins.append(False)
                continue
            case = edit_case(kind, before.attributes(), seed, settings)
            original, edited = self.run([spec.caption()], [seed], case.concepts)
            after = describe(edited[0])
            wins.append(edit_succeeded(case, before.attributes(), after.attributes()))
            if kind == "color":
                ious.append(mask_iou(describe(original[0]).mask, after.mask))
                changed = ShapeSpec(**{**vars(spec), "color": case.target})
                _, reprompted = self.run([changed.caption()], [seed])
                prompt_ious.append(mask_iou(before.mask, describe(reprompted[0]).mask))
        result = {"success": float(np.mean(wins)), "n": len(wins)}
        if ious:
            result["iou_sega"] = float(np.mean(ious))
            result["iou_prompt_change"] = float(np.mean(prompt_ious))
        return result


def sweep(pipe, seeds: list[int], grid: dict[str, list] | None = None, kinds=("color", "background", "shape", "size"),
          log: Callable[[str], None] = print) -> dict[str, dict]:
    """Pick (scale, threshold, warmup) per edit kind by success rate on tuning seeds."""
    grid = grid or {"scale": [10.0, 15.0, 20.0], "threshold": [0.5, 0.8], "warmup": [2, 5]}
    ev = Evaluator(pipe)
    best, table = {}, {}
    for kind in kinds:
        scores = []
        for scale, threshold, warmup in itertools.product(grid["scale"], grid["threshold"], grid["warmup"]):
            s = {"scale": scale, "threshold": threshold, "warmup": warmup}
            settings = {k: s for k in DEMO_PRESETS}
            r = ev.edits(kind, seeds, settings)
            scores.append((r["success"], -scale, s))
            log(f"sweep {kind:10s} scale {scale:5.1f} threshold {threshold:.2f} warmup {warmup}: {r['success']:.2f}")
        score, _, s = max(scores, key=lambda x: (x[0], x[1]))
        best[kind] = s
        table[kind] = [{"success": sc, **st} for sc, _, st in scores]
    return {"best": best, "table": table}


def run_eval(model_dir: str | Path, n_seeds: int = 24, first_seed: int = 1000, out_json: str | Path | None = None,
             presets: dict[str, dict] | None = None) -> dict:
    """Print and return prompt accuracy, edit success per kind and overall, and composition IoU."""
    t0 = time.time()
    pipe = load(model_dir)
    ev = Evaluator(pipe)
    presets = presets or DEMO_PRESETS
    seeds = list(range(first_seed, first_seed + n_seeds))
    report: dict = {"seeds": [seeds[0], seeds[-1]], "steps": ev.steps, "guidance_scale": ev.guidance_scale,
                    "momentum_scale": ev.momentum_scale, "momentum_beta": ev.momentum_beta, "presets": presets}
    report["prompt_accuracy"] = ev.prompt_accuracy(list(range(first_seed, first_seed + 4 * n_seeds)))
    print(f"prompt accuracy: {report['prompt_accuracy']:.1%} on {4 * n_seeds} seeds (target >= 90%)")
    edits = {}
    for kind in EDIT_KINDS:
        edits[kind] = ev.edits(kind, seeds, presets)
        print(f"edit success {kind:10s}: {edits[kind]['success']:.1%}")
    report["edits"] = edits
    report["edit_success_overall"] = float(np.mean([e["success"] for e in edits.values()]))
    print(f"edit success overall   : {report['edit_success_overall']:.1%} (target >= 80%)")
    c = edits["color"]
    print(f"composition IoU, colour swap: SEGA {c['iou_sega']:.3f} vs changed prompt {c['iou_prompt_change']:.3f} "
          "(target SEGA >= 0.8 and above the changed prompt)")
    report["seconds"] = round(time.time() - t0, 1)
    if out_json:
        Path(out_json).write_text(json.dumps(report, indent=2) + "\n")
    return report
