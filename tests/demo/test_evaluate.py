"""The evaluation plan: every kind of edit in both directions, written as SEGA users write it."""

import collections

import pytest

from sega.demo.evaluate import EDIT_KINDS, EditCase, edit_case, edit_succeeded
from sega.demo.presets import DEMO_PRESETS
from sega.demo.shapes import BACKGROUNDS, COLORS, SHAPES


@pytest.mark.parametrize("kind,pairs", [("background", 2), ("size", 2), ("shape", 6), ("color", 12)])
def test_seeds_cycle_through_every_direction(kind, pairs):
    cases = [edit_case(kind, s, DEMO_PRESETS) for s in range(1000, 1000 + 2 * pairs)]
    counts = collections.Counter(c.direction for c in cases)
    assert len(counts) == pairs and set(counts.values()) == {2}
    for c in cases:
        assert getattr(c.spec, kind) == c.source != c.target
        new, old = c.concepts
        assert not new.reverse and old.reverse
        assert new.prompt.split()[0] == c.target and old.prompt.split()[0] == c.source


def test_both_background_directions_and_shape_pairs_are_covered():
    bgs = {edit_case("background", s, DEMO_PRESETS).direction for s in range(900, 904)}
    assert bgs == {f"{a}→{b}" for a in BACKGROUNDS for b in BACKGROUNDS if a != b}
    shapes = {edit_case("shape", s, DEMO_PRESETS).direction for s in range(900, 906)}
    assert shapes == {f"{a}→{b}" for a in SHAPES for b in SHAPES if a != b}


def test_removal_and_three_concepts():
    removal = [edit_case("removal", s, DEMO_PRESETS) for s in range(4)]
    assert {c.source for c in removal} == set(COLORS)
    assert all(len(c.concepts) == 1 and c.concepts[0].reverse and c.spec.color == c.source for c in removal)
    assert removal[0].concepts[0].scale == DEMO_PRESETS["removal"]["scale"]
    three = [edit_case("three", s, DEMO_PRESETS) for s in range(16)]
    assert {c.spec.background for c in three} == set(BACKGROUNDS)
    assert {c.direction for c in three} == {"white→black + colour swap", "black→white + colour swap"}
    for c in three:
        assert [x.reverse for x in c.concepts] == [False, True, False]
        assert c.concepts[2].prompt.endswith(" background") and c.concepts[2].prompt.split()[0] != c.spec.background


def test_success_needs_the_new_value_and_a_visible_shape():
    case = edit_case("background", 900, DEMO_PRESETS)
    seen = {"size": "large", "color": "red", "shape": "circle", "background": case.target}
    assert edit_succeeded(case, seen)
    assert not edit_succeeded(case, {**seen, "background": case.source})
    assert not edit_succeeded(case, {**seen, "shape": None})
    removal = EditCase("removal", 0, case.spec, "red", None, ())
    assert edit_succeeded(removal, {**seen, "color": "blue"}) and not edit_succeeded(removal, seen)
    with pytest.raises(ValueError, match="kind must be one of"):
        edit_case("texture", 0, DEMO_PRESETS)
    assert set(EDIT_KINDS) == {"color", "background", "shape", "size", "removal", "three"}
