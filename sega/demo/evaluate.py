"""Evaluation and preset sweep for the bundled shapes model (``python -m sega.demo eval|sweep``).

Every kind of edit is measured in both directions: the prompt is set to the value an edit starts from, and the
seeds cycle through every (from, to) pair of the attribute, so that background white to black and black to
white (or circle to square and square to circle) are counted alike and reported apart.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..concepts import EditConcept
from ..masks import MASK_MODES
from .presets import DEMO_DEFAULTS, DEMO_PRESET_TABLES
from .shapes import BACKGROUNDS, COLORS, SHAPES, SIZES, ShapeSpec, describe, mask_iou, random_spec

EDIT_KINDS = ("color", "background", "shape", "size", "removal", "three")
KIND_VALUES = {"color": tuple(COLORS), "background": tuple(BACKGROUNDS), "shape": SHAPES, "size": SIZES}
# The presets each kind's concepts use: a swap adds the new value and removes the old one with the same preset;
# removal is one reverse concept; "three" is a colour swap plus a new background (three concepts at once).
KIND_PRESETS = {"color": ("color",), "background": ("background",), "shape": ("shape",), "size": ("size",),
                "removal": ("removal",), "three": ("color", "background")}
TUNING_SEEDS = range(0, 900)  # sweeps use these; the tests use 900-999; published figures 1000 on
BATCH = 24


def load(model_dir: str | Path):
    from ..pipeline import SegaPipeline

    pipe = SegaPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_uint8(images: np.ndarray) -> list[np.ndarray]:
    return [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in images]


def spec_for_seed(seed: int) -> ShapeSpec:
    return random_spec(np.random.default_rng(seed))


@dataclass(frozen=True)
class EditCase:
    kind: str
    seed: int
    spec: ShapeSpec  # the prompt, with the attribute to edit set to ``source``
    source: str  # the value the edit starts from (for "three": colour and background, "red+white")
    target: str | None  # the value it should end at (None for removal: anything but ``source``)
    concepts: tuple[EditConcept, ...]

    @property
    def direction(self) -> str:
        """The edit's direction as reported: for "three" the background's (the colour pairs cycle within it)."""
        if self.target is None:
            return f"no {self.source}"
        if self.kind == "three":
            return f"{self.source.split('+')[1]}→{self.target.split('+')[1]} + colour swap"
        return f"{self.source}→{self.target}"


def _pair(values: tuple[str, ...], index: int) -> tuple[str, str]:
    """The ``index``-th (from, to) pair of ``values``; consecutive indices cycle through all of them."""
    n = len(values)
    source = values[index % n]
    others = [v for v in values if v != source]
    return source, others[(index // n) % (n - 1)]


def _swap(new: str, old: str, preset: dict, fmt: Callable[[str], str] = str) -> list[EditConcept]:
    return [EditConcept(fmt(new), **preset), EditConcept(fmt(old), reverse=True, **preset)]


def edit_case(kind: str, seed: int, settings: dict[str, dict]) -> EditCase:
    """The prompt and concepts of one edit, written as SEGA users write it (add the new value, remove the old one).

    ``settings`` maps preset names (``KIND_PRESETS``) to concept keywords (scale, threshold, warmup, weight).
    """
    if kind not in EDIT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(EDIT_KINDS)}; got {kind!r}")
    spec = spec_for_seed(seed)
    background = lambda v: f"{v} background"  # noqa: E731
    if kind in KIND_VALUES:
        source, target = _pair(KIND_VALUES[kind], seed)
        concepts = _swap(target, source, settings[kind], background if kind == "background" else str)
        return EditCase(kind, seed, replace(spec, **{kind: source}), source, target, tuple(concepts))
    if kind == "removal":
        source = KIND_VALUES["color"][seed % len(COLORS)]
        concepts = [EditConcept(source, reverse=True, **settings["removal"])]
        return EditCase(kind, seed, replace(spec, color=source), source, None, tuple(concepts))
    bg_source, bg_target = _pair(KIND_VALUES["background"], seed)
    color_source, color_target = _pair(KIND_VALUES["color"], seed // 2)
    concepts = _swap(color_target, color_source, settings["color"])
    concepts.append(EditConcept(background(bg_target), **settings["background"]))
    return EditCase(kind, seed, replace(spec, color=color_source, background=bg_source),
                    f"{color_source}+{bg_source}", f"{color_target}+{bg_target}", tuple(concepts))


def edit_succeeded(case: EditCase, after: dict) -> bool:
    """The edited attribute has the new value (for removal: not the old one) and the shape is still there."""
    if after["shape"] is None:
        return False  # the shape vanished
    if case.kind == "removal":
        return after["color"] != case.source
    if case.kind == "three":
        color, background = case.target.split("+")
        return after["color"] == color and after["background"] == background
    return after[case.kind] == case.target


def others_kept(case: EditCase, before: dict, after: dict) -> bool:
    """Whether the attributes the edit should not touch read the same before and after."""
    edited = {"removal": ("color",), "three": ("color", "background")}.get(case.kind, (case.kind,))
    return all(before[k] == after[k] for k in before if k not in edited)


class Evaluator:
    """Runs prompts and edits in batches (seeds with the same concepts share a call) and reads the images."""

    def __init__(self, pipe, steps: int | None = None, guidance_scale: float | None = None,
                 momentum_scale: float | None = None, momentum_beta: float | None = None, mask: str = "none"):
        self.pipe = pipe
        self.mask_mode, self.mask = mask, MASK_MODES[mask]  # implicit masks (sega.masks.MASK_MODES)
        self.steps = steps or DEMO_DEFAULTS["steps"]
        self.guidance_scale = guidance_scale or DEMO_DEFAULTS["guidance_scale"]
        self.momentum_scale = DEMO_DEFAULTS["momentum_scale"] if momentum_scale is None else momentum_scale
        self.momentum_beta = DEMO_DEFAULTS["momentum_beta"] if momentum_beta is None else momentum_beta
        self._plain: dict[tuple, list[np.ndarray]] = {}  # runs without edits, reused across a sweep's settings

    def run(self, prompts: list[str], seeds: list[int], concepts=None):
        """(images without edits or None, images) as uint8 arrays, one per prompt and seed."""
        out = self.pipe(prompts, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np",
                        concepts=concepts, edit_momentum_scale=self.momentum_scale, edit_mom_beta=self.momentum_beta,
                        return_original=bool(concepts), **(self.mask if concepts else {}))
        edited = to_uint8(out.images)
        return (to_uint8(out.original_images) if concepts else None), edited

    def plain(self, specs: list[ShapeSpec], seeds: list[int]) -> list[np.ndarray]:
        key = (tuple(s.caption() for s in specs), tuple(seeds))
        if key not in self._plain:
            images = []
            for i in range(0, len(seeds), BATCH):
                images += self.run(list(key[0][i:i + BATCH]), seeds[i:i + BATCH])[1]
            self._plain[key] = images
        return self._plain[key]

    def prompt_accuracy(self, seeds: list[int]) -> float:
        """Share of seeds whose image shows all four attributes of a random prompt."""
        specs = [spec_for_seed(s) for s in seeds]
        found = [describe(im) for im in self.plain(specs, seeds)]
        return float(np.mean([d.attributes() == vars(s) for s, d in zip(specs, found)]))

    def outcomes(self, cases: list[EditCase]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(image without edits, edited image) per case."""
        groups: dict[tuple, list[int]] = {}
        for i, case in enumerate(cases):
            groups.setdefault(case.concepts, []).append(i)
        result: list = [None] * len(cases)
        for concepts, members in groups.items():
            for j in range(0, len(members), BATCH):
                chunk = members[j:j + BATCH]
                originals, edited = self.run([cases[i].spec.caption() for i in chunk], [cases[i].seed for i in chunk],
                                             list(concepts))
                for i, o, e in zip(chunk, originals, edited):
                    result[i] = (o, e)
        return result

    def score(self, cases: list[EditCase], images: list[tuple[np.ndarray, np.ndarray]]) -> dict:
        wins = [edit_succeeded(c, describe(e).attributes()) for c, (_, e) in zip(cases, images)]
        # "kept": a success whose other attributes read as in the image without edits.
        kept = [win and others_kept(c, describe(o).attributes(), describe(e).attributes())
                for c, (o, e), win in zip(cases, images, wins)]
        directions: dict[str, list[bool]] = {}
        for case, win in zip(cases, wins):
            directions.setdefault(case.direction, []).append(win)
        return {"success": float(np.mean(wins)), "kept": float(np.mean(kept)), "n": len(wins),
                "directions": {d: {"success": float(np.mean(w)), "n": len(w)} for d, w in directions.items()}}

    def edits(self, kind: str, seeds: list[int], settings: dict[str, dict] | None = None) -> dict:
        """Success rate of one edit kind, overall and per direction; for colour swaps also the composition IoU
        of SEGA and of changing the prompt instead (same seed), against the image without edits."""
        settings = settings or DEMO_PRESET_TABLES.table("generate", self.mask_mode)
        cases = [edit_case(kind, s, settings) for s in seeds]
        images = self.outcomes(cases)
        result = self.score(cases, images)
        if kind == "color":
            before = [describe(o).mask for o, _ in images]
            result["iou_sega"] = float(np.mean([mask_iou(b, describe(e).mask) for b, (_, e) in zip(before, images)]))
            changed = [replace(c.spec, color=c.target) for c in cases]
            reprompted = self.plain(changed, [c.seed for c in cases])
            result["iou_prompt_change"] = float(np.mean([mask_iou(b, describe(r).mask)
                                                         for b, r in zip(before, reprompted)]))
        return result


def grid(scales=(10.0, 15.0, 20.0), thresholds=(0.5, 0.8), warmups=(2, 5, 8)) -> list[dict]:
    """Settings for a sweep: scale x threshold x warmup."""
    return [{"scale": float(s), "threshold": float(t), "warmup": int(w)}
            for s, t, w in itertools.product(scales, thresholds, warmups)]


def three_grid(table: dict[str, list[dict]], base: dict[str, dict], background_grid: list[dict], top: int = 3):
    """Settings for "three" (a colour swap plus a background): the product of the best ``top`` colour and
    background settings when those kinds were swept before; else the background grid with the colour preset."""
    def best(kind):
        ranked = sorted(table[kind], key=lambda r: (r["success"], r.get("iou_sega", 0.0)), reverse=True)
        return [r["setting"] for r in ranked[:top]]

    colors = best("color") if "color" in table else [base["color"]]
    backgrounds = best("background") if "background" in table else background_grid
    return [{"color": c, "background": b} for c in colors for b in backgrounds]


def choose(kind: str, rows: list[dict], iou_target: float = 0.8) -> dict:
    """The chosen row of a kind's sweep: the best success; among those, for colour the earliest warmup whose
    composition IoU reaches ``iou_target`` (edit strength first, the composition kept), then the weakest
    direction's success, then the lowest scale."""
    def key(row):
        worst = min(row["directions"].values()) if row["directions"] else 0.0
        setting = row["setting"] if kind != "three" else {}
        iou_ok = row.get("iou_sega", 1.0) >= iou_target
        return (row["success"], iou_ok, -setting.get("warmup", 0) if "iou_sega" in row else 0, worst,
                -setting.get("scale", 0.0))

    return max(rows, key=key)


def sweep(pipe, seeds: list[int], kinds=EDIT_KINDS, grids: dict[str, list[dict]] | None = None,
          base: dict[str, dict] | None = None, log: Callable[[str], None] = print, mask: str = "none") -> dict:
    """Success (and, for colour, composition IoU) of every setting in each kind's grid, on tuning seeds.

    For a kind with one preset the grid's settings replace that preset; for "three" a grid entry maps preset
    names to settings. ``base`` gives the presets not under test (default: the mask mode's). Seeds that share
    concepts run as one batch, settings after one another.
    """
    ev = Evaluator(pipe, mask=mask)
    base = dict(base or DEMO_PRESET_TABLES.table("generate", mask))
    grids = dict(grids or {})
    table: dict[str, list[dict]] = {}
    for kind in kinds:
        if kind == "three" and "three" not in grids:
            grids["three"] = three_grid(table, base, grids.get("background") or grid())
        rows = []
        for setting in grids.get(kind) or grid():
            settings = {**base, **setting} if kind == "three" else {**base, KIND_PRESETS[kind][0]: setting}
            r = ev.edits(kind, seeds, settings)
            row = {"setting": setting, "success": r["success"], "kept": r["kept"],
                   "directions": {d: v["success"] for d, v in r["directions"].items()}}
            if "iou_sega" in r:
                row["iou_sega"], row["iou_prompt_change"] = r["iou_sega"], r["iou_prompt_change"]
            rows.append(row)
            log(f"sweep {kind:10s} {json.dumps(setting)}: {r['success']:.2f}"
                + (f" iou {r['iou_sega']:.3f}" if "iou_sega" in r else ""))
        table[kind] = rows
    return table


def run_eval(model_dir: str | Path, n_seeds: int = 48, first_seed: int = 1000, out_json: str | Path | None = None,
             presets: dict[str, dict] | None = None, kinds=EDIT_KINDS, prompt_seeds: int | None = None,
             mask: str = "none") -> dict:
    """Print and return prompt accuracy, edit success per kind (both directions) and overall, and composition IoU.

    ``kinds`` and ``prompt_seeds`` (default ``4 * n_seeds``; 0 skips) evaluate a part, e.g. to run the parts
    in separate processes on a machine whose cores are shared.
    """
    t0 = time.time()
    pipe = load(model_dir)
    ev = Evaluator(pipe, mask=mask)
    presets = presets or DEMO_PRESET_TABLES.table("generate", mask)
    seeds = list(range(first_seed, first_seed + n_seeds))
    report: dict = {"seeds": [seeds[0], seeds[-1]], "steps": ev.steps, "guidance_scale": ev.guidance_scale,
                    "momentum_scale": ev.momentum_scale, "momentum_beta": ev.momentum_beta, "presets": presets,
                    "mask": mask}
    n_prompt = 4 * n_seeds if prompt_seeds is None else prompt_seeds
    if n_prompt:
        report["prompt_accuracy"] = ev.prompt_accuracy(list(range(first_seed, first_seed + n_prompt)))
        report["prompt_seeds"] = n_prompt
        print(f"prompt accuracy: {report['prompt_accuracy']:.1%} on {n_prompt} seeds (target >= 95%)", flush=True)
    edits = {}
    for kind in kinds:
        edits[kind] = r = ev.edits(kind, seeds, presets)
        ways = ", ".join(f"{d} {v['success']:.0%}" for d, v in sorted(r["directions"].items()))
        print(f"edit success {kind:10s}: {r['success']:6.1%} of {r['n']} ({ways}); other attributes kept "
              f"{r['kept']:.1%}", flush=True)
    report["edits"] = edits
    if edits:
        report["edit_success_overall"] = float(np.mean([e["success"] for e in edits.values()]))
        worst = min(edits, key=lambda k: edits[k]["success"])
        print(f"edit success overall   : {report['edit_success_overall']:6.1%} over {len(edits)} kinds (target >= 80%; "
              f"every kind >= 60%, lowest {worst} {edits[worst]['success']:.1%})")
    if "color" in edits:
        c = edits["color"]
        print(f"composition IoU, colour swap: SEGA {c['iou_sega']:.3f} vs changed prompt {c['iou_prompt_change']:.3f} "
              "(target SEGA >= 0.8 and above the changed prompt)")
    report["seconds"] = round(time.time() - t0, 1)
    print(f"({report['seconds']:.0f}s)")
    if out_json:
        Path(out_json).write_text(json.dumps(report, indent=2) + "\n")
    return report
