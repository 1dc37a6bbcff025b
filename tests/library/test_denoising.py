"""The denoising loop's building blocks on plain values."""

import torch

from sega.concepts import ConceptSettings
from sega.denoising import clone_generator, plan_edits


def test_a_cloned_generator_continues_the_same_stream_independently():
    g = torch.Generator().manual_seed(3)
    torch.randn(2, generator=g)
    clone = clone_generator(g)
    assert torch.equal(torch.randn(4, generator=clone), torch.randn(4, generator=g))
    assert clone_generator(None) is None


def concepts(warmup: list[int]) -> ConceptSettings:
    n = len(warmup)
    return ConceptSettings(["c"] * n, None, [5.0] * n, [0.9] * n, warmup, [None] * n, [1.0] * n)


def test_the_runs_split_at_the_first_edit():
    """The pair shares every step before the first one at which an edit is applied."""
    assert plan_edits(concepts([3, 2]), 6, True, 0.1, False)[2] == 2
    assert plan_edits(concepts([]), 6, True, 0.1, False)[2] == 6  # no edits: never
    assert plan_edits(concepts([9]), 6, True, 0.1, False)[2] == 6  # an edit after the last step: never
    assert plan_edits(concepts([]), 6, True, 0.1, True)[2] == 0  # replayed guidance applies from the start
    # Guidance off: the edited run needs e_u as soon as a concept is evaluated (momentum off: at its warmup).
    assert plan_edits(concepts([3]), 6, False, 0.0, False)[2] == 3
