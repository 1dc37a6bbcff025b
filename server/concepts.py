"""The ``concepts`` parameter: a list of API concepts (dicts) as :class:`~sega.concepts.EditConcept`s, each
filled in from its preset (of the model's table for the request's endpoint and mask)."""

from __future__ import annotations

from collections.abc import Mapping

from sega.concepts import EditConcept, show_value

from .context import Context
from .errors import InvalidInput
from .text import text

CONCEPT_KEYS = ("prompt", "scale", "threshold", "warmup", "reverse", "cooldown", "weight", "preset")


def parse_concept(index: int, raw, ctx: Context) -> EditConcept:
    """One API concept (a dict) as an EditConcept; its ``preset`` (or the default one) fills missing keys."""
    where = f"concepts[{index}]"
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"{where} must be an object with the keys {', '.join(CONCEPT_KEYS)}; "
                           f"got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in CONCEPT_KEYS)
    if unknown:
        raise InvalidInput(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(CONCEPT_KEYS)}")
    if raw.get("prompt") is None:
        raise InvalidInput(f"{where}.prompt is required (the concept's text, e.g. \"smiling\")")
    prompt = text(f"{where}.prompt", raw["prompt"], ctx, required=True)
    profile = ctx.loaded.profile
    preset = raw.get("preset")
    presets = profile.presets.table(ctx.endpoint, ctx.mask)
    if preset is not None and (not isinstance(preset, str) or preset not in presets):
        raise InvalidInput(f"{where}.preset must be one of {', '.join(presets)}; got {show_value(preset)}")
    values = profile.concept_defaults(preset, ctx.endpoint, ctx.mask)
    values.pop("preset")
    values.update({k: v for k, v in raw.items() if k not in ("prompt", "preset") and v is not None})
    try:
        return EditConcept(prompt=prompt, **values)
    except ValueError as exc:
        raise InvalidInput(f"{where}.{exc}") from None


def check_concepts(value, ctx: Context) -> tuple[EditConcept, ...]:
    limit = ctx.limits.max_concepts
    if not isinstance(value, (list, tuple)):
        raise InvalidInput(f"concepts must be a list of objects (up to {limit}), got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidInput(f"concepts may hold at most {limit} concepts, got {len(value)}")
    return tuple(parse_concept(i, item, ctx) for i, item in enumerate(value))
