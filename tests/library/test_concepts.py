"""EditConcept validation, property-based: any values are either accepted as given or refused with a
ValueError that names a field which is wrong; never another exception."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sega import EditConcept
from sega.concepts import MAX_EDIT_SCALE, MAX_STEP_INDEX, MAX_WEIGHT

FIELDS = ("prompt", "scale", "threshold", "warmup", "cooldown", "reverse", "weight")

anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([10**400, -(10**400), 10**5000, 2**63, -1]),
    st.floats(), st.floats(-2, 2), st.floats(0, 1, exclude_max=True), st.integers(0, 12_000),
    st.text(max_size=6), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.none(), max_size=1),
    st.builds(np.float64, st.floats()), st.builds(np.int64, st.integers(-5, 5)), st.just(np.bool_(True)),
    st.builds(Decimal, st.integers(0, 5)), st.builds(Fraction, st.integers(0, 5), st.integers(1, 5)),
    st.complex_numbers(max_magnitude=5), st.binary(max_size=3), st.just(float("nan")),
)
prompts = st.one_of(st.text(max_size=8), st.just("  \n"), st.just("blue"), anything)
concept_kwargs = st.fixed_dictionaries({"prompt": prompts}, optional={f: anything for f in FIELDS[1:]})


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def _in(v, low, high, *, integer=False, high_inclusive=True) -> bool:
    if not _is_number(v) or (isinstance(v, float) and math.isinf(v)):
        return False
    if integer and isinstance(v, float) and not v.is_integer():
        return False
    return low <= v and (v <= high if high_inclusive else v < high)


def problems(kwargs: dict) -> set[str]:
    """The fields whose value EditConcept must refuse (an independent statement of its documented rules)."""
    given = {"scale": 5.0, "threshold": 0.9, "warmup": 10, "cooldown": None, "reverse": False, "weight": 1.0, **kwargs}
    ok = {
        "prompt": isinstance(given["prompt"], str) and bool(given["prompt"].strip()),
        "scale": _in(given["scale"], 0, MAX_EDIT_SCALE),
        "threshold": _in(given["threshold"], 0, 1, high_inclusive=False),
        "warmup": _in(given["warmup"], 0, MAX_STEP_INDEX, integer=True),
        "cooldown": given["cooldown"] is None or _in(given["cooldown"], 0, MAX_STEP_INDEX, integer=True),
        "reverse": isinstance(given["reverse"], bool),
        "weight": _in(given["weight"], 0, MAX_WEIGHT),
    }
    return {name for name, good in ok.items() if not good}


@settings(deadline=None)  # max_examples: the tier's hypothesis profile (tests/conftest.py)
@given(kwargs=concept_kwargs)
@example(kwargs={"prompt": "blue", "scale": 10**400})
@example(kwargs={"prompt": "blue", "warmup": 2.0, "cooldown": 10_000, "threshold": 0.0, "weight": 100})
@example(kwargs={"prompt": "blue", "threshold": 1.0})
@example(kwargs={"prompt": "blue", "warmup": np.float64(2.5)})
def test_any_values_are_accepted_as_given_or_refused_naming_a_wrong_field(kwargs):
    wrong = problems(kwargs)
    try:
        concept = EditConcept(**kwargs)
    except ValueError as exc:
        message = str(exc)
        named = message.split(" ", 1)[0]
        assert named in wrong, (message, wrong)
        assert " must be " in message and len(message) < 300
        return
    assert not wrong, (concept, wrong)
    for name in FIELDS:
        if name in kwargs:
            assert getattr(concept, name) == kwargs[name]
    assert type(concept.scale) is float and type(concept.threshold) is float and type(concept.weight) is float
    assert type(concept.warmup) is int and (concept.cooldown is None or type(concept.cooldown) is int)
    assert hash(concept) == hash(EditConcept(**kwargs))  # frozen, usable as a key


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": "blue", "scale": -1}, "scale must be a number in [0, 100], got -1"),
    ({"prompt": "blue", "threshold": 1}, "threshold must be a number in [0, 1), got 1"),
    ({"prompt": "blue", "warmup": 1.5}, "warmup must be an integer in [0, 10000], got the fraction 1.5"),
    ({"prompt": "blue", "cooldown": "3"}, "cooldown must be an integer in [0, 10000] or None, got '3' (str)"),
    ({"prompt": "blue", "weight": 10**400}, "weight must be a number in [0, 100], got an integer of about 401 digits"),
    ({"prompt": "blue", "reverse": 1}, "reverse must be true or false, got 1"),
    ({"prompt": " "}, "prompt must be a non-empty string"),
    ({"prompt": ["blue"]}, "prompt must be a string, got list"),
])
def test_the_message_names_the_field_and_the_allowed_range(kwargs, message):
    with pytest.raises(ValueError) as info:
        EditConcept(**kwargs)
    assert str(info.value).startswith(message)
