"""What the app knows about the kind of model it serves: one profile per kind, instead of branches.

A profile holds the per-concept presets, the generation defaults, the examples, the intro text and the
placeholders. The served model's native size comes from the pipeline itself (:func:`native_size`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from sega.demo.editing import DEMO_EDIT_DEFAULTS, DEMO_EDIT_EXAMPLES
from sega.demo.presets import DEMO_DEFAULTS, DEMO_EXAMPLES, DEMO_PRESET_TABLES
from sega.demo.previews import DEMO_LATENT_RGB_BIAS, DEMO_LATENT_RGB_FACTORS
from sega.demo.shapes import BACKGROUNDS, COLORS, SHAPES, SIZES, VOCAB_WORDS
from sega.pipeline import SegaPipeline
from sega.pipeline_flux import SegaFluxPipeline
from sega.pipeline_xl import SegaXLPipeline
from sega.presets import (
    FLUX_DEV_DEFAULTS,
    FLUX_DEV_PRESET_TABLES,
    FLUX_SCHNELL_DEFAULTS,
    FLUX_SCHNELL_PRESET_TABLES,
    SD_DEFAULTS,
    SD_PRESET_TABLES,
    SDXL_DEFAULTS,
    SDXL_EDIT_DEFAULTS,
    SDXL_PRESET_TABLES,
    PresetTables,
)
from sega.previews import (
    FLUX_LATENT_RGB_BIAS,
    FLUX_LATENT_RGB_FACTORS,
    SD15_LATENT_RGB_FACTORS,
    SDXL_LATENT_RGB_BIAS,
    SDXL_LATENT_RGB_FACTORS,
)

# (label, prompt, concepts as the API takes them, seed)
Example = tuple[str, str, list[dict], int]


@dataclass(frozen=True)
class ModelProfile:
    """Everything the app shows or defaults to that depends on the kind of model served."""

    name: str
    presets: PresetTables  # per endpoint and mask mode: presets.table(endpoint, mask)
    defaults: dict  # steps, guidance_scale, momentum_scale, momentum_beta, default_preset, mask
    examples: list[Example]
    intro: str  # Markdown; "{size}" stands for the native size in pixels
    prompt_placeholder: str
    concept_placeholder: str
    edit_defaults: dict  # /edit: steps, skip, source_guidance_scale, mask
    # The "Edit an image" tab's examples: (label, image path, source prompt, concepts, seed); none for SD.
    edit_examples: list = field(default_factory=list)
    # GPU time (server.service.gpu_duration): seconds per UNet sample of 512x512 px (scaled by area), headroom
    # included, and a fixed allowance per request (text encoding, decoding, start-up).
    gpu_seconds_per_sample: float = 0.04
    gpu_fixed_seconds: float = 10.0
    # Limits on a ZeroGPU Space (None: server.limits.ZERO_GPU_LIMITS), so that the largest request's
    # reservation stays within an anonymous visitor's daily quota.
    zero_gpu_limits: dict | None = None
    # Live previews without the VAE: the latent-to-RGB factors for this family (sega.previews: ComfyUI's for SD
    # and SDXL; sega.demo.previews: fitted to the demo model's VAE).
    preview_factors: tuple = SD15_LATENT_RGB_FACTORS
    preview_bias: tuple | None = None
    # Whether a loaded pipeline is of this kind (PROFILES asks each in turn; the last one takes any pipeline).
    serves: Callable[[SegaPipeline], bool] = lambda _pipe: True
    # Whether guidance_scale is classifier-free guidance (two estimates per image: with and without the prompt);
    # FLUX's is distilled into the model (one estimate). server.service.gpu_duration counts the estimates.
    classifier_free_guidance: bool = True
    # The API parameters this kind of model has no use for: the form leaves them out, the API refuses a value
    # for them (server.params), and they add nothing to the library call.
    unused_params: frozenset[str] = frozenset()
    # Keywords every library call on this kind of model gets (e.g. FLUX's T5 length).
    library_keywords: dict = field(default_factory=dict)
    # Whether /edit (inverting an uploaded image) works with it: SD and SDXL only.
    edits_uploads: bool = True

    @property
    def default_preset(self) -> str:
        return self.defaults["default_preset"]

    def concept_defaults(self, preset: str | None = None, endpoint: str = "generate", mask: str = "none") -> dict:
        """Every key of a concept but its text, from ``preset`` (default: the profile's default preset)."""
        name = preset or self.default_preset
        return {"preset": name, **self.presets.table(endpoint, mask)[name], "reverse": False, "cooldown": None,
                "weight": 1.0}


def is_demo_model(pipe: SegaPipeline) -> bool:
    """The bundled shapes model (or a copy of it, e.g. a training checkpoint) has its own tiny vocabulary."""
    vocab = pipe.tokenizer.get_vocab()
    return len(vocab) < 100 and set(VOCAB_WORDS) <= set(vocab)


DEMO_PROFILE = ModelProfile(
    name="demo",
    serves=lambda pipe: not isinstance(pipe, SegaXLPipeline) and is_demo_model(pipe),
    presets=DEMO_PRESET_TABLES,
    defaults=DEMO_DEFAULTS,
    examples=DEMO_EXAMPLES,
    intro=("The bundled **demo model** draws {size}×{size} px shapes; it knows only these words: "
           f"{', '.join(SIZES)}; {', '.join(COLORS)}; {', '.join(SHAPES)}; on a {' / '.join(BACKGROUNDS)} "
           "background. Try a concept such as `blue` or `black background`."),
    prompt_placeholder="a large red circle on a white background",
    concept_placeholder="e.g. blue (leave empty to skip)",
    edit_defaults=DEMO_EDIT_DEFAULTS,
    edit_examples=DEMO_EDIT_EXAMPLES,
    preview_factors=DEMO_LATENT_RGB_FACTORS,
    preview_bias=DEMO_LATENT_RGB_BIAS,
)

SD_PROFILE = ModelProfile(
    name="stable-diffusion",
    presets=SD_PRESET_TABLES,
    defaults=SD_DEFAULTS,
    examples=[
        ("face: smile, glasses, curls, beard (the authors' example)", "a photo of the face of a woman", [
            {"prompt": "smiling, smile", "scale": 4, "threshold": 0.99, "warmup": 10, "preset": "face"},
            {"prompt": "glasses, wearing glasses", "scale": 5, "threshold": 0.975, "warmup": 10, "preset": "face"},
            {"prompt": "curls, wavy hair, curly hair", "scale": 5, "threshold": 0.925, "warmup": 10, "preset": "face"},
            {"prompt": "beard, full beard, mustache", "scale": 5.4, "threshold": 0.96, "warmup": 10, "preset": "face"},
        ], 21),
        ("castle: add a boat, paint like Monet", "a castle next to a river", [
            {"prompt": "boat on a river, boat", "preset": "object"},
            {"prompt": "monet, impression, sunrise", "preset": "style"},
        ], 48),
        ("street: remove the cars", "a crowded city street with cars, photo", [
            {"prompt": "cars, traffic", "reverse": True, "preset": "object"},
        ], 7),
    ],
    intro=("Describe an image, then add **concepts** to steer it towards (add) or away from (remove) an idea "
           "while the rest of the picture stays put."),
    prompt_placeholder="a photo of the face of a woman",
    concept_placeholder="e.g. glasses, wearing glasses (leave empty to skip)",
    # LEDITS++'s defaults for SD 1.5: 50 steps, skip 0.15, source guidance 3.5.
    edit_defaults={"steps": 50, "skip": 0.15, "source_guidance_scale": 3.5, "mask": "none"},
)


SDXL_PROFILE = ModelProfile(
    name="stable-diffusion-xl",
    serves=lambda pipe: isinstance(pipe, SegaXLPipeline),
    presets=SDXL_PRESET_TABLES,
    defaults=SDXL_DEFAULTS,
    examples=SD_PROFILE.examples,
    intro=SD_PROFILE.intro + " Stable Diffusion XL works best at {size}×{size} px.",
    prompt_placeholder=SD_PROFILE.prompt_placeholder,
    concept_placeholder=SD_PROFILE.concept_placeholder,
    edit_defaults=SDXL_EDIT_DEFAULTS,
    # An estimate, not a measurement (no GPU has been lent to this project yet; `python -m benchmarks.sdxl
    # --device cuda` prints the measured figure): an SDXL UNet sample at 1024 px costs about 3.5 times an
    # SD 1.5 sample at 512 px, i.e. 70 ms for SD's 20 ms, doubled like SD's: 0.14 s per 1024 px sample,
    # 0.035 per 512 px of area. The fixed part covers two text encoders and float32 VAE decodes at 1024 px.
    gpu_seconds_per_sample=0.035,
    gpu_fixed_seconds=15.0,
    # Largest request on ZeroGPU: /edit, 50 steps, 4 concepts, 1024 px -> 15 + 50 * 10 * 0.14 = 85 s, within
    # an anonymous visitor's 120 s a day.
    zero_gpu_limits={"max_steps": 50, "max_size": 1024, "max_concepts": 4},
    # At most 4 UNet samples per call, so that the largest request (the pair and 6 concepts: 10 samples a step
    # at 1024 px) fits a 24 GB card (an A10G, the Space's suggested_hardware) in float16: weights about 7 GB,
    # about 2.5 GB of activations per 1024 px sample (an estimate from SDXL's attention at 4096 tokens, not a
    # measurement). The split changes the images by float rounding only (sega: max_samples_per_call).
    library_keywords={"max_samples_per_call": 4},
    preview_factors=SDXL_LATENT_RGB_FACTORS,
    preview_bias=SDXL_LATENT_RGB_BIAS,
)



def is_flux(pipe: SegaPipeline, guidance_embeds: bool) -> bool:
    """A FLUX.1 pipeline: [dev] (and other guidance-distilled ones) embeds a guidance scale, [schnell] has none."""
    return isinstance(pipe, SegaFluxPipeline) and bool(pipe.transformer.config.guidance_embeds) == guidance_embeds


FLUX_DEV_PROFILE = ModelProfile(
    name="flux-dev",
    serves=lambda pipe: is_flux(pipe, guidance_embeds=True),
    presets=FLUX_DEV_PRESET_TABLES,
    defaults=FLUX_DEV_DEFAULTS,
    examples=[
        ("portrait: add glasses", "a photo of the face of a woman", [
            {"prompt": "glasses, wearing glasses", "preset": "default"}], 21),
        ("street: remove the cars", "a crowded city street with cars, photo", [
            {"prompt": "cars, traffic", "reverse": True, "preset": "default"}], 7),
    ],
    intro=("**FLUX.1** with semantic guidance: describe an image, then add **concepts** to steer it towards (add) "
           "or away from (remove) an idea. FLUX works best at {size}×{size} px. Editing uploaded images needs a "
           "Stable Diffusion or SDXL model."),
    prompt_placeholder=SD_PROFILE.prompt_placeholder,
    concept_placeholder=SD_PROFILE.concept_placeholder,
    edit_defaults={},
    edits_uploads=False,
    classifier_free_guidance=False,
    # No negative prompt (true CFG would double the cost; the app leaves it off), FLUX's own flow-matching
    # scheduler, and no implicit masks (they are read from a UNet's cross-attention).
    unused_params=frozenset({"negative_prompt", "scheduler", "mask"}),
    library_keywords={"max_sequence_length": 512},
    # An estimate, not a measurement (no GPU has been lent to this project yet): FLUX.1's 12B transformer takes
    # about 0.2 s per 1024 px sample on an H100 in bfloat16, doubled for headroom like SD's: 0.4 s per 1024 px
    # sample, 0.1 per 512 px of area. The fixed part covers CLIP and T5-XXL encoding and the VAE decodes.
    gpu_seconds_per_sample=0.1,
    gpu_fixed_seconds=20.0,
    # Largest request on ZeroGPU: 28 steps, 3 concepts, 1024 px -> 20 + 28 * 5 * 0.4 = 76 s, within an
    # anonymous visitor's 120 s a day.
    zero_gpu_limits={"max_steps": 28, "max_size": 1024, "max_concepts": 3},
    preview_factors=FLUX_LATENT_RGB_FACTORS,
    preview_bias=FLUX_LATENT_RGB_BIAS,
)

FLUX_SCHNELL_PROFILE = dataclasses.replace(
    FLUX_DEV_PROFILE,
    name="flux-schnell",
    serves=lambda pipe: is_flux(pipe, guidance_embeds=False),
    presets=FLUX_SCHNELL_PRESET_TABLES,
    defaults=FLUX_SCHNELL_DEFAULTS,
    # No guidance embedding: the guidance scale would be ignored.
    unused_params=FLUX_DEV_PROFILE.unused_params | {"guidance_scale"},
    library_keywords={"max_sequence_length": 256},  # FLUX.1-schnell's T5 length (diffusers' docs)
    # Largest request on ZeroGPU: 8 steps, 4 concepts, 1024 px -> 20 + 8 * 6 * 0.4 = 40 s.
    zero_gpu_limits={"max_steps": 8, "max_size": 1024, "max_concepts": 4},
)


# Every kind of model the app serves, asked in turn (a new kind is one more profile here); SD's takes the rest.
PROFILES: tuple[ModelProfile, ...] = (FLUX_DEV_PROFILE, FLUX_SCHNELL_PROFILE, SDXL_PROFILE, DEMO_PROFILE, SD_PROFILE)


def profile_for(pipe: SegaPipeline) -> ModelProfile:
    """The first profile in :data:`PROFILES` that serves ``pipe``."""
    return next(profile for profile in PROFILES if profile.serves(pipe))


def profile_named(name: str) -> ModelProfile:
    """The profile called ``name`` (a request carries its model's profile by name: it travels pickled)."""
    return next(profile for profile in PROFILES if profile.name == name)


def native_size(pipe: SegaPipeline) -> int:
    """The model's training resolution in pixels (512 for SD 1.5, 32 for the demo model, 1024 for FLUX.1)."""
    if isinstance(pipe, SegaFluxPipeline):
        return int(pipe.default_sample_size * pipe.vae_scale_factor)
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def size_multiple(pipe: SegaPipeline) -> int:
    """What a width or height must be a multiple of: one latent pixel, or for FLUX one packed 2x2 patch of them."""
    return 2 * pipe.vae_scale_factor if isinstance(pipe, SegaFluxPipeline) else 8


def min_size(pipe: SegaPipeline) -> int:
    """The smallest image the denoiser can take: one latent pixel after the UNet's last downsampling (FLUX:
    one packed patch)."""
    if isinstance(pipe, SegaFluxPipeline):
        return max(8, size_multiple(pipe))
    return max(8, int(pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)))
