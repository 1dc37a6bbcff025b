"""The guidance math on plain tensors."""

import pytest
import torch

from sega.guidance import concept_directions, plan_step, quantile_per_row, semantic_guidance_step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantile_per_row_matches_torch_quantile(dtype):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 2, 4, 37, generator=g).to(dtype)
    q = torch.tensor([0.0, 0.9, 0.975])
    got = quantile_per_row(values, q)
    for c in range(3):
        want = torch.quantile(values[c].float(), q[c].item(), dim=-1)
        torch.testing.assert_close(got[c], want, rtol=0, atol=1e-6)
    assert got.dtype == torch.float32


def test_concept_directions_keeps_top_share_and_sign():
    g = torch.Generator().manual_seed(1)
    uncond = torch.randn(2, 4, 10, 10, generator=g)
    concepts = torch.randn(2, 2, 4, 10, 10, generator=g)
    psi = concept_directions(uncond, concepts, torch.tensor([3.0, -2.0]), torch.tensor([0.9, 0.5]))
    raw = (concepts - uncond) * torch.tensor([3.0, -2.0]).view(2, 1, 1, 1, 1)
    kept = (psi != 0).float().mean(dim=(-1, -2))  # share kept per (concept, image, channel)
    assert torch.allclose(kept[0], torch.full_like(kept[0], 0.1), atol=0.011)
    assert torch.allclose(kept[1], torch.full_like(kept[1], 0.5), atol=0.011)
    nonzero = psi != 0
    assert torch.equal(psi[nonzero], raw[nonzero])  # kept entries are the scaled, signed directions
    # Everything kept is at least as large as anything dropped, per channel.
    for c in range(2):
        for b in range(2):
            for ch in range(4):
                k, r = nonzero[c, b, ch], raw[c, b, ch].abs()
                assert r[k].min() >= r[~k].max()


def test_plan_step_follows_the_reference_rules():
    # Nobody warmed up: no edit term, momentum weights for live concepts.
    p = plan_step(0, warmup=[2, 4], cooldown=[None, None], weights=[1.0, 3.0])
    assert p.edit_weights is None and p.momentum_weights == (1.0, 3.0)
    # Some warmed up: normalised weights among the active ones, no momentum.
    p = plan_step(2, warmup=[2, 4], cooldown=[None, None], weights=[1.0, 3.0])
    assert p.edit_weights == (1.0, 0.0) and not p.use_momentum
    # All warmed up: raw (unnormalised) weights with momentum.
    p = plan_step(5, warmup=[2, 4], cooldown=[None, None], weights=[1.0, 3.0])
    assert p.edit_weights == (1.0, 3.0) and p.use_momentum
    # Cooled down and negative weights count as 0.
    p = plan_step(5, warmup=[2, 4], cooldown=[5, None], weights=[1.0, -3.0])
    assert p.momentum_weights == (0.0, 0.0)
    # A zero total among the active would be NaN in the reference: we apply a zero edit instead.
    p = plan_step(3, warmup=[2, 4], cooldown=[3, None], weights=[1.0, 1.0])
    assert p.edit_weights == (0.0, 0.0)


def test_semantic_guidance_step_momentum():
    psi = torch.ones(2, 1, 1, 2, 2)
    v = torch.zeros(1, 1, 2, 2)
    plan = plan_step(0, [1, 1], [None, None], [1.0, 1.0])
    w = torch.tensor([1.0, 1.0])
    term, v = semantic_guidance_step(psi, plan, v, w, None, 0.5, 0.6)
    assert term is None  # warmup: momentum only
    torch.testing.assert_close(v, torch.full_like(v, 0.4 * 2))
    plan = plan_step(1, [1, 1], [None, None], [1.0, 1.0])
    term, v2 = semantic_guidance_step(psi, plan, v, w, w, 0.5, 0.6)
    torch.testing.assert_close(term, torch.full_like(v, 2 + 0.5 * 0.8))
    torch.testing.assert_close(v2, 0.6 * v + 0.4 * term)
