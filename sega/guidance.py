"""Semantic guidance math on plain tensors: no models, no I/O.

SEGA (Brack et al., "SEGA: Instructing Text-to-Image Models using Semantic Guidance", NeurIPS 2023,
arXiv 2301.12247), as diffusers' deprecated ``SemanticStableDiffusionPipeline`` computes it. At step i, one UNet
call gives the unconditional estimate e_u, the prompt's e_p and each concept's e_c; then

    g     = s_g (e_p - e_u)                                  classifier-free guidance
    psi_c = s_c (+-1) (e_c - e_u)                            minus for a concept to remove (reverse)
    psi_c = psi_c where |psi_c| >= quantile(|psi_c|, lambda_c) per (image, channel), else 0
    e     = e_u + g + edit term,     z = scheduler.step(e, t, z)

Concept c is active from step warmup_c and contributes until cooldown_c; weights w_c are clipped at 0.
Momentum v starts at 0 and is updated at every step, warmup included: G = sum_c w_c psi_c + s_m v,
v <- beta v + (1 - beta) G. The edit term is G when every concept is active, the weight-normalised sum
of the active concepts' psi_c (without momentum) when only some are, and nothing when none is. This
discontinuity is the reference's, kept so that old users' images do not change.

Shapes: B images, C edit concepts, latents (B, ch, H, W). Concept estimates are stacked as
(C, B, ch, H, W). Everything that depends only on the step index (which concepts are warmed up
or cooled down, the weights) is decided on the host from Python numbers, so the denoising loop
never has to read a tensor back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def classifier_free_guidance(noise_uncond: torch.Tensor, noise_text: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """g = s_g * (e_p - e_u): the classifier-free guidance term (without e_u)."""
    return guidance_scale * (noise_text - noise_uncond)


def quantile_per_row(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Linear-interpolation quantile over the last dim, with a different q for each leading row.

    ``values`` is (C, ..., N) and ``q`` is (C,) with entries in [0, 1]. Returns (C, ...). Computed in
    float32 exactly like ``torch.quantile(..., interpolation="linear")``, but for all concepts in one
    sort instead of one quantile call per concept.
    """
    v = values.float().sort(dim=-1).values
    n = v.shape[-1]
    shape = (q.shape[0],) + (1,) * (v.dim() - 1)
    rank = q.float().reshape(shape) * (n - 1)
    below = rank.long()
    above = rank.ceil().long().clamp(max=n - 1)
    index_shape = v.shape[:-1] + (1,)
    v_below = v.gather(-1, below.expand(index_shape))
    v_above = v.gather(-1, above.expand(index_shape))
    return torch.lerp(v_below, v_above, (rank - below).expand(index_shape)).squeeze(-1)


def concept_directions(
    noise_uncond: torch.Tensor,
    noise_concepts: torch.Tensor,
    signed_scales: torch.Tensor,
    thresholds: torch.Tensor,
) -> torch.Tensor:
    """psi_c = s_c * (+-1) * (e_c - e_u), kept only where |psi_c| >= its per-(image, channel) quantile.

    Args:
        noise_uncond: (B, ch, H, W) unconditional estimate e_u.
        noise_concepts: (C, B, ch, H, W) concept estimates e_c.
        signed_scales: (C,) edit scale, negated for concepts to remove (reverse).
        thresholds: (C,) edit thresholds lambda_c in [0, 1).

    Returns:
        (C, B, ch, H, W) thresholded concept directions, in the dtype of the estimates.
    """
    c = noise_concepts.shape[0]
    psi = (noise_concepts - noise_uncond.unsqueeze(0)) * signed_scales.reshape(c, 1, 1, 1, 1).to(noise_concepts.dtype)
    return keep_top_per_channel(psi, thresholds)


def keep_top_per_channel(psi: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """SEGA's threshold on directions (C, B, ch, H, W): keep psi where |psi| >= the ``thresholds[c]`` quantile of
    |psi| over its (image, channel) plane, else 0. Used with and without masks (:mod:`sega.masks`)."""
    magnitude = psi.abs()
    tau = quantile_per_row(magnitude.flatten(start_dim=3), thresholds).to(psi.dtype)
    return torch.where(magnitude >= tau[..., None, None], psi, torch.zeros_like(psi))


@dataclass(frozen=True)
class StepPlan:
    """What the reference does with the concepts at one step, decided on the host.

    ``momentum_weights`` (C,) weigh every concept not yet cooled down (negatives clipped to 0) for the
    momentum sum G. ``edit_weights`` is None when no edit term is applied at this step; otherwise (C,)
    weights for the edit term and ``use_momentum`` says whether that term is G itself (every concept
    warmed up) or a weight-normalised sum over the warmed-up concepts without momentum.
    """

    momentum_weights: tuple[float, ...]
    edit_weights: tuple[float, ...] | None
    use_momentum: bool


def plan_step(step: int, warmup: list[int], cooldown: list[int | None], weights: list[float]) -> StepPlan:
    """Decide warmup, cooldown and weights for step ``step`` exactly as the reference pipeline does."""
    clipped = [max(float(w), 0.0) for w in weights]
    live = [cd is None or step < cd for cd in cooldown]
    momentum_weights = tuple(w if alive else 0.0 for w, alive in zip(clipped, live))
    active = [step >= wu for wu in warmup]
    n_active = sum(active)
    if n_active == 0:
        return StepPlan(momentum_weights, None, False)
    if n_active == len(warmup):
        return StepPlan(momentum_weights, momentum_weights, True)
    # Some but not all concepts are active: the reference normalises their weights (cooled-down
    # ones count as 0). A zero total would give NaN in the reference; we apply no edit instead.
    total = sum(w for w, a in zip(momentum_weights, active) if a)
    if total == 0.0:
        return StepPlan(momentum_weights, tuple(0.0 for _ in warmup), False)
    return StepPlan(momentum_weights, tuple(w / total if a else 0.0 for w, a in zip(momentum_weights, active)), False)


def semantic_guidance_step(
    psi: torch.Tensor,
    plan: StepPlan,
    momentum: torch.Tensor,
    momentum_weights: torch.Tensor,
    edit_weights: torch.Tensor | None,
    momentum_scale: float,
    momentum_beta: float,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Combine thresholded concept directions into this step's edit term and update the momentum.

    Args:
        psi: (C, B, ch, H, W) from :func:`concept_directions`.
        plan: from :func:`plan_step` for this step.
        momentum: (B, ch, H, W) momentum v, zeros at the first step.
        momentum_weights / edit_weights: ``plan``'s weights as (C,) tensors on psi's device.
        momentum_scale: s_m, how much of v is added to G.
        momentum_beta: beta, v <- beta * v + (1 - beta) * G.

    Returns:
        (edit term or None when no edit is applied at this step, new momentum).
    """
    total = torch.einsum("c,cbijk->bijk", momentum_weights, psi) + momentum_scale * momentum
    new_momentum = momentum_beta * momentum + (1 - momentum_beta) * total
    if plan.edit_weights is None:
        return None, new_momentum
    if plan.use_momentum:
        return total, new_momentum
    return torch.einsum("c,cbijk->bijk", edit_weights, psi), new_momentum


def concepts_needed(plans: list[StepPlan], momentum_scale: float) -> list[list[int]]:
    """Per step, the concepts whose estimate can change the result (the others need no model evaluation).

    A concept matters at step i when it enters that step's edit term, or when it feeds the momentum and the
    momentum is used at i or later (momentum scale non-zero and a step at or after i applies G).
    """
    needed, momentum_used_later = [], False
    for plan in reversed(plans):
        momentum_used_later = momentum_used_later or (momentum_scale != 0 and plan.use_momentum)
        needed.append([
            c for c in range(len(plan.momentum_weights))
            if ((momentum_used_later or plan.use_momentum) and plan.momentum_weights[c] != 0)
            or (plan.edit_weights is not None and not plan.use_momentum and plan.edit_weights[c] != 0)
        ])
    return needed[::-1]
