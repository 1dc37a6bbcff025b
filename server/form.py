"""The browser form's numeric widgets, derived from the declarations the API validates against.

Each widget's range comes from the parameter's bounds (:class:`server.params.Param` ``bounds``, the concept
bounds :data:`sega.concepts.CONCEPT_RANGES`) for the served model and the limits; its starting value from the
defaults (:func:`server.params.defaults`, the profile's default preset). This module adds only what a form needs
besides: a label, a step, a help text, and, where a slider would be useless over the API's whole range, a
narrower top (:attr:`Look.top`), which is widened again to cover every preset of the profile. ``app.py`` builds
its widgets from :func:`settings` and :func:`concept_widgets`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sega.concepts import CONCEPT_RANGES, Range

from . import params as api
from .loading import LoadedModel, ModelFacts

Model = LoadedModel | ModelFacts


@dataclass(frozen=True)
class Look:
    """How the form shows one number: label, step, help, and a top narrower than the API's (or None)."""

    label: str
    step: float
    info: str | None = None
    top: Callable[[Model, api.Limits], float] | None = None


@dataclass(frozen=True)
class Widget:
    """One numeric widget: ``[low, high]`` in steps of ``step`` from ``low``, starting at ``default``
    (None: empty, which means the API's default, e.g. a cooldown of "never")."""

    name: str
    low: float
    high: float
    step: float
    default: Any
    label: str
    info: str | None = None
    integer: bool = False

    def fits(self, value: Any) -> bool:
        """Whether the widget can hold ``value`` (in range and on a step); None fits an optional widget."""
        if value is None:
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        steps = (value - self.low) / self.step
        return math.isclose(steps, round(steps), abs_tol=1e-6)


def _at_most(limit: float) -> Callable[[Model, api.Limits], float]:
    return lambda _model, _limits: limit


def _max_steps(_model: Model, limits: api.Limits) -> float:
    return limits.max_steps


# The endpoints' numeric settings, by API parameter name ("endpoint.name" for one endpoint's own look).
LOOKS: dict[str, Look] = {
    "seed": Look("Seed", 1),
    "steps": Look("Steps", 1),
    "guidance_scale": Look("Guidance scale", 0.5),
    "source_guidance_scale": Look("Guidance scale", 0.5),
    # Up to twice the model's native size: larger images of a model trained at one size repeat their content.
    "width": Look("Width", 8, top=lambda model, _limits: 2 * model.native_size),
    "height": Look("Height", 8, top=lambda model, _limits: 2 * model.native_size),
    "momentum_scale": Look("Momentum scale", 0.05, top=_at_most(2.0)),
    "momentum_beta": Look("Momentum beta", 0.01),
    # /edit's own guidance is empty unless set: then it is the source guidance, which reconstructs the image.
    "edit.guidance_scale": Look("Guidance of the edit (empty: the same as above, which reconstructs your image "
                                "exactly)", 0.5),
    "skip": Look("Skip: how much of the image to keep", 0.05,
                 info="The share of the first denoising steps left out; higher keeps more of your image, lower "
                      "lets the edits change more."),
}
# A concept row's numbers, by EditConcept field.
CONCEPT_LOOKS: dict[str, Look] = {
    "scale": Look("Edit scale", 0.1, top=_at_most(20.0),
                  info="How hard the concept pulls: higher changes the image more."),
    "threshold": Look("Threshold", 0.005,
                      info="Higher edits LESS of the image: 0.95 edits only the 5 % the concept pulls hardest."),
    # A warmup or cooldown past the last step never applies (or never ends): the form stops at the most steps.
    "warmup": Look("Warmup (steps)", 1, top=_max_steps,
                   info="The step the edit starts at: later keeps more of the layout."),
    "cooldown": Look("Cooldown step (empty: never)", 1, top=_max_steps),
    "weight": Look("Weight", 0.1, top=_at_most(5.0)),
}


def _widget(name: str, bounds: Range, look: Look, default: Any, covers: list[float], model: Model,
            limits: api.Limits) -> Widget:
    """A widget over ``bounds``, narrowed to ``look.top`` but never below a value in ``covers``."""
    high = bounds.high if bounds.high_inclusive else bounds.high - look.step
    if look.top is not None:
        high = min(high, max([look.top(model, limits), *covers]))
    step = max(look.step, bounds.multiple_of or 0)
    return Widget(name, bounds.low, high, step, default, look.label, look.info, bounds.integer)


def settings(model: Model, limits: api.Limits, endpoint: str = "generate") -> dict[str, Widget]:
    """The numeric settings of an endpoint's form, by API parameter name."""
    defaults = api.defaults(model, endpoint)
    widgets = {}
    for p in api.ENDPOINTS[endpoint]:
        if p.bounds is None:
            continue
        # The seed box starts at 0; a default that follows another parameter starts empty.
        default = 0 if p.name == "seed" else None if p.default_from else defaults[p.name]
        look = LOOKS.get(f"{endpoint}.{p.name}", LOOKS[p.name])
        widgets[p.name] = _widget(p.name, p.bounds(model, limits), look, default,
                                  [default] if default is not None else [], model, limits)
    return widgets


def concept_widgets(model: Model, limits: api.Limits, endpoint: str = "generate") -> dict[str, Widget]:
    """A concept row's numbers, starting at the default preset's values; each covers every preset's value
    (of every preset table: both endpoints, with and without masks, so that any row can hold any of them)."""
    profile = model.profile
    defaults = profile.concept_defaults(endpoint=endpoint)
    presets = [*(p for table in profile.presets.tables() for p in table.values()), defaults]
    return {name: _widget(name, CONCEPT_RANGES[name], look, defaults[name],
                          [p[name] for p in presets if p.get(name) is not None], model, limits)
            for name, look in CONCEPT_LOOKS.items()}
