"""Per-concept presets (scale, threshold, warmup) and generation defaults for Stable Diffusion 1.x/2.x.

The values are the SEGA authors' published ones (Brack et al., arXiv 2301.12247, SD 1.5, 50 steps):
edit scale 3 to 10 (their examples 4 to 5.4), threshold 0.9 to 0.99, warmup 5 to 10 steps, momentum scale 0.3
and beta 0.6, guidance scale 7. The bundled demo model has its own, in :mod:`sega.demo.presets`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .pipeline_flux import DEFAULT_WARMUP_FRACTION


def preset_table(**presets: tuple[float, float, int]) -> dict[str, dict]:
    """A table of presets, one ``name=(scale, threshold, warmup)`` each."""
    return {name: {"scale": scale, "threshold": threshold, "warmup": warmup}
            for name, (scale, threshold, warmup) in presets.items()}


@dataclass(frozen=True)
class PresetTables:
    """One model kind's per-concept presets (scale, threshold, warmup by preset name): for generation, and for
    uploaded images (the inverted image keeps its layout), each without and with an implicit mask (LEDITS++: the
    threshold is then the share of the mask left out, so a model may need other values). A missing table is
    the unmasked one of the same endpoint, then generation's. An endpoint's tables have the same preset names."""

    generate: dict[str, dict]
    edit: dict[str, dict] | None = None
    masked_generate: dict[str, dict] | None = None
    masked_edit: dict[str, dict] | None = None

    def table(self, endpoint: str = "generate", mask: str = "none") -> dict[str, dict]:
        """The presets of ``endpoint`` ("generate" or "edit") under ``mask`` (a mode of sega.masks.MASK_MODES):
        the one lookup, for the app, its model profiles and the demo model's evaluation."""
        unmasked = self.edit if endpoint == "edit" and self.edit else self.generate
        if mask == "none":
            return unmasked
        return (self.masked_edit if endpoint == "edit" else self.masked_generate) or unmasked

    def has_masked(self, endpoint: str = "generate") -> bool:
        """Whether masked edits of ``endpoint`` have presets of their own."""
        return (self.masked_edit if endpoint == "edit" else self.masked_generate) is not None

    def tables(self) -> list[dict[str, dict]]:
        """Every table (both endpoints, with and without masks)."""
        return [self.table(endpoint, mask) for endpoint in ("generate", "edit") for mask in ("none", "masked")]


SD_PRESETS: dict[str, dict] = preset_table(
    object=(5.0, 0.95, 10), style=(7.0, 0.9, 5), face=(5.0, 0.975, 10), custom=(5.0, 0.95, 10),
)
SD_PRESET_TABLES = PresetTables(SD_PRESETS)
SD_DEFAULTS: dict = {"steps": 50, "guidance_scale": 7.0, "momentum_scale": 0.3, "momentum_beta": 0.6,
                     "default_preset": "face", "mask": "none"}

# Stable Diffusion XL. Generation: the SEGA authors publish no SDXL numbers, so the presets are the SD ones
# above (the same guidance ranges), at StableDiffusionXLPipeline's default guidance scale 5.0. Uploaded images:
# LEDITS++'s SDXL defaults and example (diffusers' LEditsPPPipelineStableDiffusionXL: edit_guidance_scale 5,
# edit_threshold 0.9, warmup 0; its example adds "tomato" at scale 10, threshold 0.85 and removes "tennis ball"
# at 5, 0.9, after inverting with skip 0.2 and source guidance 3.5).
SDXL_PRESETS: dict[str, dict] = {name: dict(values) for name, values in SD_PRESETS.items()}
SDXL_EDIT_PRESETS: dict[str, dict] = preset_table(
    object=(10.0, 0.85, 0), style=(5.0, 0.9, 0), face=(5.0, 0.9, 0), custom=(5.0, 0.9, 0),
)
SDXL_PRESET_TABLES = PresetTables(SDXL_PRESETS, edit=SDXL_EDIT_PRESETS)
SDXL_DEFAULTS: dict = {"steps": 50, "guidance_scale": 5.0, "momentum_scale": 0.3, "momentum_beta": 0.6,
                       "default_preset": "face", "mask": "none"}
SDXL_EDIT_DEFAULTS: dict = {"steps": 50, "skip": 0.2, "source_guidance_scale": 3.5, "mask": "none"}

# FLUX.1 (sega.pipeline_flux.SegaFluxPipeline). No published per-concept numbers, so one preset: SegaFluxPipeline's
# defaults, which are diffusers' community FLUX SEGA pipeline's (examples/community/pipeline_flux_semantic_guidance.py:
# edit scale 5, threshold 0.9, momentum scale 0.1, beta 0.4), but with the warmup scaled to the steps: 15% of them
# (sega.pipeline_flux.DEFAULT_WARMUP_FRACTION), where the community pipeline's fixed 8 would never edit on
# [schnell]'s 4 steps. Steps and guidance: [dev] 28 steps at guidance 3.5 (diffusers' FluxPipeline defaults, as on
# the model card); [schnell] 4 steps (distilled for them; no guidance embedding, so no guidance scale).
FLUX_DEV_STEPS, FLUX_SCHNELL_STEPS = 28, 4


def flux_preset_tables(steps: int) -> PresetTables:
    """The FLUX preset for ``steps`` denoising steps (the warmup is a share of them)."""
    return PresetTables(preset_table(default=(5.0, 0.9, round(DEFAULT_WARMUP_FRACTION * steps))))


FLUX_DEV_PRESET_TABLES = flux_preset_tables(FLUX_DEV_STEPS)
FLUX_SCHNELL_PRESET_TABLES = flux_preset_tables(FLUX_SCHNELL_STEPS)
FLUX_DEV_DEFAULTS: dict = {"steps": FLUX_DEV_STEPS, "guidance_scale": 3.5, "momentum_scale": 0.1,
                           "momentum_beta": 0.4, "default_preset": "default", "mask": "none"}
FLUX_SCHNELL_DEFAULTS: dict = {**FLUX_DEV_DEFAULTS, "steps": FLUX_SCHNELL_STEPS, "guidance_scale": None}
