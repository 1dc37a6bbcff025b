"""Edit concepts: what to steer towards or away from, and how hard."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_EDIT_SCALE = 100.0
MAX_WEIGHT = 100.0
MAX_STEP_INDEX = 10_000


def show_value(value) -> str:
    """A short repr of ``value`` for an error message: huge integers and long values are abbreviated."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"{'a negative' if value < 0 else 'an'} integer of about {digits} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _show_bound(x: float) -> str:
    # Whole bounds in full (a seed's 4294967295, not 4.29497e+09).
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_number(name: str, value, low: float, high: float, *, integer: bool = False,
                 allow_none: bool = False, high_inclusive: bool = True):
    """Return ``value`` checked to be a finite number in range, or raise a ValueError naming ``name``."""
    if value is None and allow_none:
        return None
    kind = "an integer" if integer else "a number"
    hi = "]" if high_inclusive else ")"
    allowed = f"{kind} in [{_show_bound(low)}, {_show_bound(high)}{hi}" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {allowed}, got {show_value(value)} ({type(value).__name__})")
    # ints are compared exactly (never through float(), which overflows past 1e308)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be {allowed}, got {show_value(value)}")
    if integer and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} must be {allowed}, got the fraction {show_value(value)}")
    if value > high or value < low or (value == high and not high_inclusive):
        raise ValueError(f"{name} must be {allowed}, got {show_value(value)}")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class Range:
    """The values a numeric parameter accepts: ``[low, high]`` (``[low, high)`` when ``high_inclusive`` is
    False), integers only when ``integer``, multiples of ``multiple_of`` when set.

    One declaration serves both the check (:meth:`check`) and whatever shows the parameter (a form's slider).
    """

    low: float
    high: float
    integer: bool = False
    high_inclusive: bool = True
    multiple_of: int | None = None

    def check(self, name: str, value: Any, *, allow_none: bool = False) -> Any:
        """``value`` checked (a ValueError naming ``name`` and this range otherwise), as an int or a float."""
        value = check_number(name, value, self.low, self.high, integer=self.integer, allow_none=allow_none,
                             high_inclusive=self.high_inclusive)
        if value is not None and self.multiple_of and value % self.multiple_of:
            raise ValueError(f"{name} must be a multiple of {self.multiple_of} in [{_show_bound(self.low)}, "
                             f"{_show_bound(self.high)}], got {show_value(value)}")
        return value

    def __contains__(self, value: Any) -> bool:
        try:
            self.check("value", value)
        except ValueError:
            return False
        return True


# The bounds of a concept's numbers (EditConcept checks them; the app's form shows them).
CONCEPT_RANGES: dict[str, Range] = {
    "scale": Range(0.0, MAX_EDIT_SCALE),
    "threshold": Range(0.0, 1.0, high_inclusive=False),
    "warmup": Range(0, MAX_STEP_INDEX, integer=True),
    "cooldown": Range(0, MAX_STEP_INDEX, integer=True),
    "weight": Range(0.0, MAX_WEIGHT),
}


@dataclass(frozen=True)
class EditConcept:
    """One semantic direction, validated on construction.

    Args:
        prompt: the concept's text, e.g. ``"smiling, smile"``. Must contain a non-space character.
        scale: edit guidance scale s_e in [0, 100]; how hard the concept pulls. Typical 3 to 10 for SD.
        threshold: edit threshold lambda in [0, 1); the share of latent positions per channel left
            untouched. 0.95 edits only the 5% where the concept pulls hardest. Typical 0.9 to 0.99.
        warmup: the step index at which the concept starts to be applied, an integer in [0, 10000].
            Momentum is accumulated during warmup. Typical 5 to 10 of 50 steps.
        cooldown: the step index at which the concept stops contributing, or None for never.
        reverse: False adds the concept ("glasses"); True removes it ("no beard": prompt "beard").
        weight: relative weight in [0, 100] among several concepts (default 1).
    """

    prompt: str
    scale: float = 5.0
    threshold: float = 0.9
    warmup: int = 10
    cooldown: int | None = None
    reverse: bool = False
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not self.prompt.strip():
            raise ValueError("prompt must be a non-empty string (the concept's text)")
        if not isinstance(self.reverse, bool):
            raise ValueError(f"reverse must be true or false, got {show_value(self.reverse)}")
        for name, bounds in CONCEPT_RANGES.items():
            value = bounds.check(name, getattr(self, name), allow_none=name == "cooldown")
            object.__setattr__(self, name, value)


@dataclass
class ConceptSettings:
    """A call's concepts resolved from either API (``concepts=`` or the ``editing_prompt``/``edit_*`` keywords),
    as plain Python values, one entry per concept."""

    prompts: list[str] | None
    embeddings: Any  # a (C, seq, dim) tensor instead of prompts, or None
    signed_scales: list[float]
    thresholds: list[float]
    warmup: list[int]
    cooldown: list[int | None]
    weights: list[float]

    def __len__(self) -> int:
        return len(self.signed_scales)

    @classmethod
    def none(cls) -> ConceptSettings:
        return cls(None, None, [], [], [], [], [])


def per_concept(value, n: int, name: str) -> list:
    """The reference's broadcasting: one value for every concept, or a list with one per concept."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} edit concepts")
        return list(value)
    return [value] * n


def resolve_concepts(concepts, editing_prompt, editing_prompt_embeddings, reverse_editing_direction,
                     edit_guidance_scale, edit_warmup_steps, edit_cooldown_steps, edit_threshold,
                     edit_weights) -> ConceptSettings:
    """The concepts of a call: from ``concepts`` (EditConcepts or dicts of their fields) or from the deprecated
    pipeline's keywords, broadcast as it does; passing both raises."""
    if concepts is not None:
        if editing_prompt or editing_prompt_embeddings is not None:
            raise ValueError("pass either concepts or editing_prompt/editing_prompt_embeddings, not both")
        concepts = [c if isinstance(c, EditConcept) else EditConcept(**c) for c in concepts]
        return ConceptSettings(
            prompts=[c.prompt for c in concepts],
            embeddings=None,
            signed_scales=[-c.scale if c.reverse else c.scale for c in concepts],
            thresholds=[c.threshold for c in concepts],
            warmup=[c.warmup for c in concepts],
            cooldown=[c.cooldown for c in concepts],
            weights=[c.weight for c in concepts],
        )
    prompts, embeddings, n = None, None, 0
    if editing_prompt:
        prompts = [editing_prompt] if isinstance(editing_prompt, str) else list(editing_prompt)
        n = len(prompts)
    elif editing_prompt_embeddings is not None:
        embeddings = editing_prompt_embeddings
        n = embeddings.shape[0]
    reverse = per_concept(reverse_editing_direction, n, "reverse_editing_direction")
    scales = per_concept(edit_guidance_scale, n, "edit_guidance_scale")
    return ConceptSettings(
        prompts=prompts,
        embeddings=embeddings,
        signed_scales=[-float(s) if r else float(s) for s, r in zip(scales, reverse)],
        thresholds=[float(t) for t in per_concept(edit_threshold, n, "edit_threshold")],
        warmup=[int(w) for w in per_concept(edit_warmup_steps, n, "edit_warmup_steps")],
        cooldown=per_concept(edit_cooldown_steps, n, "edit_cooldown_steps"),
        weights=[float(w) for w in edit_weights] if edit_weights else [1.0] * n,
    )
