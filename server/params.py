"""The public API's parameters, declared once.

Each :class:`Param` says how its raw value is checked, what it defaults to on the served model, and which
keywords of the library call it becomes. Everything else derives from this table: request validation
(:func:`parse_request`), the defaults the UI and the API start with (:func:`defaults`), the JSON of the
parameters used, the pipeline call that :func:`server.service.generate` executes and the two "as code" snippets
(:mod:`server.snippets`), which render the very same keyword mapping as text.

Adding a parameter to ``/generate`` means adding a :class:`Param` to :data:`GENERATE_PARAMS` and, if the UI shows
it, a widget in ``app.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from sega.attention import quarter_resolution_layers
from sega.concepts import EditConcept, Range, show_value
from sega.inversion import performed_steps
from sega.masks import MASK_MODES

from .errors import InvalidInput
from .images import read_upload, upload_path
from .loading import LoadedModel, ModelFacts, on_zero_gpu

MAX_SEED = 2**32 - 1
MAX_GUIDANCE_SCALE = 30.0
MAX_MOMENTUM_SCALE = 10.0
SCHEDULERS = {"DDIM": DDIMScheduler, "DPM-Solver++": DPMSolverMultistepScheduler, "Euler": EulerDiscreteScheduler}
DEFAULT_SCHEDULER = "DDIM"
CONCEPT_KEYS = ("prompt", "scale", "threshold", "warmup", "reverse", "cooldown", "weight", "preset")


# ----------------------------------------------------------------------------------------------
# Limits
# ----------------------------------------------------------------------------------------------


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"environment variable {name} must be a positive integer, got {raw!r}")
    return value


# ZeroGPU's documented limits (https://huggingface.co/docs/hub/spaces-zerogpu, "Usage Tiers" and "Duration
# Management"): a daily GPU quota of 2 minutes for unauthenticated visitors, 3.5 minutes for free accounts and
# 25 minutes for PRO; a call reserves its declared duration (60 s unless set), and a shorter one gets a better
# place in ZeroGPU's queue. A request whose reservation exceeds what the visitor has left is refused outright
# ("You have exceeded your ... quota (Ns requested vs. Ms left)"), so on ZeroGPU the default limits keep the
# largest request's reservation (server.service.gpu_duration: 60 steps, 6 concepts, 768 px -> 64 s) to about half of
# an anonymous visitor's day. SEGA_MAX_STEPS, SEGA_MAX_SIZE and SEGA_MAX_CONCEPTS still raise them.
ZERO_GPU_LIMITS = {"max_steps": 60, "max_size": 768, "max_concepts": 6}
# Each ZeroGPU call runs in its own forked worker on its own GPU slice, and a call waits in ZeroGPU's own queue
# (up to 60 s, "No GPU was available after 60s") while it holds a Gradio slot. One slot would make every
# visitor wait behind one visitor's ZeroGPU queueing; four lets that many calls be scheduled at once while
# bounding the forked workers (each a copy-on-write copy of this process) a burst can start.
ZERO_GPU_CONCURRENCY = 4


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on a request; set with SEGA_MAX_STEPS, SEGA_MAX_SIZE, SEGA_MAX_CONCEPTS,
    SEGA_MAX_PROMPT_CHARS, SEGA_MAX_IMAGE_MB and SEGA_MAX_IMAGE_PIXELS (on a ZeroGPU Space the defaults of the
    first three are :data:`ZERO_GPU_LIMITS`)."""

    max_steps: int = 100
    max_size: int = 1024
    max_concepts: int = 6
    max_prompt_chars: int = 1000
    max_image_mb: int = 25  # an uploaded image's file size
    max_image_pixels: int = 50_000_000  # its decoded size (a 50-megapixel photo); bigger is refused unread

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, zero_gpu_limits: Mapping[str, int] | None = None) -> Limits:
        """``zero_gpu_limits``: the served model's defaults on ZeroGPU (its profile's), else ZERO_GPU_LIMITS."""
        env = os.environ if env is None else env
        base = cls(**(zero_gpu_limits or ZERO_GPU_LIMITS)) if on_zero_gpu(env) else cls()
        return cls(
            max_steps=_env_int(env, "SEGA_MAX_STEPS", base.max_steps),
            max_size=_env_int(env, "SEGA_MAX_SIZE", base.max_size),
            max_concepts=_env_int(env, "SEGA_MAX_CONCEPTS", base.max_concepts),
            max_prompt_chars=_env_int(env, "SEGA_MAX_PROMPT_CHARS", base.max_prompt_chars),
            max_image_mb=_env_int(env, "SEGA_MAX_IMAGE_MB", base.max_image_mb),
            max_image_pixels=_env_int(env, "SEGA_MAX_IMAGE_PIXELS", base.max_image_pixels),
        )


def queue_settings(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(queue size, concurrency)`` from SEGA_QUEUE_SIZE (requests that may wait, default 32) and
    SEGA_CONCURRENCY (generations that run at the same time; default 1, on ZeroGPU :data:`ZERO_GPU_CONCURRENCY`,
    as each call there runs in its own worker)."""
    env = os.environ if env is None else env
    concurrency = ZERO_GPU_CONCURRENCY if on_zero_gpu(env) else 1
    return _env_int(env, "SEGA_QUEUE_SIZE", 32), _env_int(env, "SEGA_CONCURRENCY", concurrency)


# ----------------------------------------------------------------------------------------------
# Checks shared by the declarations
# ----------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What a check may look at besides the value: the served model, the limits, notices to add."""

    loaded: LoadedModel
    limits: Limits
    upload_roots: tuple[str, ...] = ()  # where uploaded files may be read from (gradio's cache)
    endpoint: str = "generate"
    notices: list[str] = field(default_factory=list)
    served: tuple[str, ...] = ()  # the models a request may choose (default: the one loaded)
    mask: str = "none"  # the request's mask mode: a concept's preset comes from that mode's table


def clean_text(name: str, value, max_chars: int) -> tuple[str, list[str]]:
    """Text without control characters (tabs and newlines become spaces), stripped; with notices."""
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidInput(f"{name} must be at most {max_chars} characters, got {len(value)}")
    kept, removed = [], 0
    for ch in value:
        if unicodedata.category(ch) == "Cc":
            removed += 1
            if ch in "\t\n\r":
                kept.append(" ")
        else:
            kept.append(ch)
    notices = [f"{name}: removed {removed} control character(s)."] if removed else []
    return "".join(kept).strip(), notices


def text(name: str, value, ctx: Context, *, required: bool = False) -> str:
    """A prompt-like text: cleaned, with a notice when the tokenizer will truncate it."""
    cleaned, notices = clean_text(name, value, ctx.limits.max_prompt_chars)
    if required and not cleaned:
        raise InvalidInput(f"{name} must be non-empty text")
    ctx.notices += notices
    dropped = ctx.loaded.pipe.truncated_text(cleaned) if cleaned else None
    if dropped:
        limit = ctx.loaded.pipe.tokenizer.model_max_length
        ctx.notices.append(f"{name} is longer than the model's {limit}-token limit; this part was ignored: {dropped!r}.")
    return cleaned


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
    presets = profile.presets_for(ctx.endpoint, ctx.mask)
    if preset is not None and (not isinstance(preset, str) or preset not in presets):
        raise InvalidInput(f"{where}.preset must be one of {', '.join(presets)}; got {show_value(preset)}")
    values = profile.concept_defaults(preset, ctx.endpoint, ctx.mask)
    values.pop("preset")
    values.update({k: v for k, v in raw.items() if k not in ("prompt", "preset") and v is not None})
    try:
        return EditConcept(prompt=prompt, **values)
    except ValueError as exc:
        raise InvalidInput(f"{where}.{exc}") from None


def _concepts(value, ctx: Context) -> tuple[EditConcept, ...]:
    limit = ctx.limits.max_concepts
    if not isinstance(value, (list, tuple)):
        raise InvalidInput(f"concepts must be a list of objects (up to {limit}), got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidInput(f"concepts may hold at most {limit} concepts, got {len(value)}")
    return tuple(parse_concept(i, item, ctx) for i, item in enumerate(value))


def _steps(model: LoadedModel | ModelFacts, limits: Limits) -> Range:
    # More steps than the scheduler has training timesteps cannot be sampled; say so here, not in the worker.
    return Range(1, min(limits.max_steps, model.train_timesteps), integer=True)


def _size(model: LoadedModel | ModelFacts, limits: Limits) -> Range:
    return Range(model.min_size, limits.max_size, integer=True, multiple_of=8)


def _fixed(bounds: Range) -> Callable[[Any, Limits], Range]:
    """Bounds that depend on neither the model nor the limits."""
    return lambda _model, _limits: bounds


def _mask(value, ctx: Context) -> str:
    if not isinstance(value, str) or value not in MASK_MODES:
        raise InvalidInput(f"mask must be one of {', '.join(MASK_MODES)}; got {show_value(value)}")
    if value != "none" and not quarter_resolution_layers(ctx.loaded.pipe.unet):
        raise InvalidInput(f"mask {value!r} needs cross-attention two downsamplings below the latent, which this "
                           "model's UNet does not have; use mask \"none\"")
    return value


def _mask_keyword(mode: str) -> list[Keyword]:
    """"none" adds no keyword (plain SEGA); the others LEDITS++'s flag (sega.masks.MASK_MODES)."""
    return [Keyword.literal(name, value) for name, value in MASK_MODES[mode].items()]


MASK_DOC = ("implicit masks (LEDITS++): none (SEGA's threshold per channel), cross-attention (each concept edits "
            "only where its words attend; threshold = share of the map left out) or intersect (that, and only "
            "where its edit is strong); the JSON's masks show where each concept edited")


def _model(value, ctx: Context) -> str:
    served = ctx.served or (ctx.loaded.model_id,)
    if not isinstance(value, str) or value not in served:
        raise InvalidInput(f"model must be one of the served models: {', '.join(served)}; got {show_value(value)}")
    return value


def _scheduler(value, ctx: Context) -> str:
    # isinstance first: an unhashable value (a list, an object) cannot be looked up in the table
    if not isinstance(value, str) or value not in SCHEDULERS:
        raise InvalidInput(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {show_value(value)}")
    return value


# ----------------------------------------------------------------------------------------------
# Library keywords, as values and as source text
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keyword:
    """One keyword of a library call: Python source, and how to build the same value for a pipeline.

    ``call`` is the call it belongs to: ``"pipe"`` (``pipe(...)``) or ``"invert"`` (``pipe.invert(...)``).
    ``imports`` are the lines the source needs. :func:`server.service.generate` calls ``build(pipe)``;
    :mod:`server.snippets` writes ``source``.
    """

    name: str
    source: str
    build: Callable[[Any], Any]
    imports: tuple[str, ...] = ()
    call: str = "pipe"

    @classmethod
    def literal(cls, name: str, value, call: str = "pipe") -> Keyword:
        return cls(name, repr(value), lambda _pipe: value, call=call)


def _generator_keyword(seed: int, call: str = "pipe") -> list[Keyword]:
    return [Keyword("generator", f'torch.Generator("cpu").manual_seed({seed})',
                    lambda _pipe: torch.Generator("cpu").manual_seed(seed), ("import torch",), call)]


def _scheduler_keyword(name: str) -> list[Keyword]:
    cls = SCHEDULERS[name]
    return [Keyword("scheduler", f"{cls.__name__}.from_config(pipe.scheduler.config)",
                    lambda pipe: cls.from_config(pipe.scheduler.config), (f"from diffusers import {cls.__name__}",))]


def _concepts_keyword(concepts: tuple[EditConcept, ...]) -> list[Keyword]:
    if not concepts:
        return []  # no concepts: a plain Stable Diffusion run
    items = "".join(
        "\n        EditConcept(" + ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(c).items()) + "),"
        for c in concepts
    )
    return [Keyword("concepts", f"[{items}\n    ]", lambda _pipe: list(concepts), ("from sega import EditConcept",))]


def _as(*keywords: str, convert: Callable[[Any], Any] = lambda v: v) -> Callable[[Any], list[Keyword]]:
    """The value as literal keyword(s): ``"name"`` for ``pipe(...)``, ``"invert.name"`` for ``pipe.invert(...)``."""
    def build(value) -> list[Keyword]:
        out = []
        for keyword in keywords:
            call, _, name = keyword.rpartition(".")
            out.append(Keyword.literal(name, convert(value), call or "pipe"))
        return out
    return build


# ----------------------------------------------------------------------------------------------
# The declarations
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One named API parameter.

    Args:
        name: its name in the API, the JSON of the parameters used and the UI's request.
        kind: the API's input type: "text", "json", "int" or "float".
        doc: one line for the API docs.
        check: ``check(raw value, ctx)`` -> the validated value, or raise :class:`InvalidInput`; None for a
            number checked against ``bounds``.
        default: ``default(loaded)`` for a missing value; None makes the parameter required (unless
            ``default_from`` names an earlier parameter whose value is the default).
        keywords: the library keywords it becomes, ``keywords(value) -> [Keyword, ...]``.
        to_json: the value as JSON (default: unchanged).
        client_source: how the gradio_client snippet writes the JSON value (default: as a literal).
        bounds: a number's allowed values, ``bounds(model, limits)`` -> :class:`~sega.concepts.Range`; the
            check and the app's form (:mod:`server.form`) both read it.
    """

    name: str
    kind: str
    doc: str
    check: Callable[[Any, Context], Any] | None
    default: Callable[[LoadedModel], Any] | None
    keywords: Callable[[Any], list[Keyword]]
    to_json: Callable[[Any], Any] = lambda v: v
    client_source: Callable[[Any], str] | None = None  # the value in the gradio_client snippet, from its JSON
    default_from: str | None = None  # take the default from this earlier parameter's value instead
    bounds: Callable[[LoadedModel | ModelFacts, Limits], Range] | None = None

    def validate(self, value, ctx: Context) -> Any:
        """The checked value, or :class:`InvalidInput` naming this parameter."""
        if self.check is not None:
            return self.check(value, ctx)
        try:
            return self.bounds(ctx.loaded, ctx.limits).check(self.name, value)
        except ValueError as e:
            raise InvalidInput(str(e)) from None


def _profile_default(key: str) -> Callable[[LoadedModel], Any]:
    return lambda loaded: loaded.profile.defaults[key]


def _random_seed(_loaded: LoadedModel) -> int:
    return secrets.randbelow(MAX_SEED + 1)


def _native_size(loaded: LoadedModel) -> int:
    return loaded.native_size


def _empty_text(_loaded: LoadedModel) -> str:
    return ""


def _model_id(loaded: LoadedModel) -> str:
    return loaded.model_id


# The order is the API's positional order (new parameters go last, so positional callers keep working).
GENERATE_PARAMS: tuple[Param, ...] = (
    Param("prompt", "text", "what the image shows (required)",
          check=lambda v, ctx: text("prompt", v, ctx, required=True), default=None, keywords=_as("prompt")),
    Param("concepts", "json", "edit concepts: objects with prompt (required), scale, threshold, warmup, reverse, "
          "cooldown, weight, preset; a preset fills the keys not given (with a mask: from the model's presets for "
          "masks, where it has them)",
          check=_concepts, default=lambda _loaded: [], keywords=_concepts_keyword,
          to_json=lambda concepts: [dataclasses.asdict(c) for c in concepts]),
    Param("seed", "int", f"random seed in [0, {MAX_SEED}] (default: random, returned in the JSON)",
          check=None, bounds=_fixed(Range(0, MAX_SEED, integer=True)), default=_random_seed,
          keywords=_generator_keyword),
    Param("steps", "int", "denoising steps", check=None, bounds=_steps, default=_profile_default("steps"),
          keywords=_as("num_inference_steps")),
    Param("guidance_scale", "float", f"classifier-free guidance in [0, {MAX_GUIDANCE_SCALE:g}]",
          check=None, bounds=_fixed(Range(0, MAX_GUIDANCE_SCALE)),
          default=_profile_default("guidance_scale"), keywords=_as("guidance_scale")),
    Param("negative_prompt", "text", "what the image should not show",
          check=lambda v, ctx: text("negative_prompt", v, ctx), default=_empty_text,
          keywords=_as("negative_prompt", convert=lambda v: v or None)),
    Param("width", "int", "width in pixels, a multiple of 8", check=None, bounds=_size, default=_native_size,
          keywords=_as("width")),
    Param("height", "int", "height in pixels, a multiple of 8", check=None, bounds=_size, default=_native_size,
          keywords=_as("height")),
    Param("momentum_scale", "float", f"SEGA momentum scale in [0, {MAX_MOMENTUM_SCALE:g}]",
          check=None, bounds=_fixed(Range(0, MAX_MOMENTUM_SCALE)),
          default=_profile_default("momentum_scale"), keywords=_as("edit_momentum_scale")),
    Param("momentum_beta", "float", "SEGA momentum beta in [0, 1)",
          check=None, bounds=_fixed(Range(0, 1, high_inclusive=False)),
          default=_profile_default("momentum_beta"), keywords=_as("edit_mom_beta")),
    Param("scheduler", "text", f"sampler: {', '.join(SCHEDULERS)}", check=_scheduler,
          default=lambda _loaded: DEFAULT_SCHEDULER, keywords=_scheduler_keyword),
    Param("mask", "text", MASK_DOC, check=_mask, default=_profile_default("mask"), keywords=_mask_keyword),
    # Which served model runs the request: its own limits, presets and defaults apply (the library snippet
    # loads it with from_pretrained, so it adds no keyword).
    Param("model", "text", "which of the served models (hub id or folder, as the JSON's model says; default: "
          "the first served)", check=_model, default=_model_id, keywords=lambda _model: []),
)
API_PARAMS: tuple[str, ...] = tuple(p.name for p in GENERATE_PARAMS)
# Fixed keywords of every app call (/generate and /edit): both images (for /edit, the reconstruction without
# edits), in one pass (one UNet call per step for both).
APP_KEYWORDS = [Keyword.literal("return_original", True)]


# ----------------------------------------------------------------------------------------------
# Editing an uploaded image: /edit
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadedImage:
    """An uploaded image made ready for the model, and what names it in the JSON of the parameters used."""

    image: PIL.Image.Image
    name: str  # the file's name as uploaded
    sha256: str  # of the prepared image's pixels

    def to_json(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "width": self.image.width, "height": self.image.height}


def _image(value, ctx: Context) -> UploadedImage:
    path = upload_path(value, ctx.upload_roots)
    image, notes = read_upload(path, ctx.loaded.native_size, ctx.limits.max_image_mb, ctx.limits.max_image_pixels)
    ctx.notices += notes
    name = (value.get("orig_name") if isinstance(value, Mapping) else None) or path.name
    return UploadedImage(image, str(name), hashlib.sha256(image.tobytes()).hexdigest())


def _image_keyword(upload: UploadedImage) -> list[Keyword]:
    size = max(upload.image.size)
    return [Keyword("image", f"load_image({upload.name!r}, size={size})[0]", lambda _pipe: upload.image,
                    ("from sega.images import load_image",), "invert")]


def _edit_default(key: str) -> Callable[[LoadedModel], Any]:
    return lambda loaded: loaded.profile.edit_defaults[key]


_BY_NAME = {p.name: p for p in GENERATE_PARAMS}
# The order is /edit's positional order. The inversion and the edit share the source prompt, the steps and the
# seed; concepts, guidance and momentum act in the edit, as in /generate.
EDIT_PARAMS: tuple[Param, ...] = (
    Param("image", "file", "the image to edit: PNG, JPEG or WebP (gradio_client.handle_file(path))",
          check=_image, default=None, keywords=_image_keyword, to_json=UploadedImage.to_json,
          client_source=lambda upload: f"handle_file({upload['name']!r})"),
    Param("source_prompt", "text", "what the image shows (optional; empty works too)",
          check=lambda v, ctx: text("source_prompt", v, ctx), default=_empty_text,
          keywords=_as("prompt", "invert.source_prompt")),
    _BY_NAME["concepts"],
    dataclasses.replace(_BY_NAME["seed"], doc="random seed of the inversion's noise (default: random)",
                        keywords=lambda seed: _generator_keyword(seed, "invert")),
    dataclasses.replace(_BY_NAME["steps"], default=_edit_default("steps"), keywords=_as("invert.num_inference_steps")),
    Param("skip", "float", "how much of the image to keep, in [0, 1): the share of the first denoising steps "
          "skipped; more keeps more of the original",
          check=None, bounds=_fixed(Range(0, 1, high_inclusive=False)), default=_edit_default("skip"),
          keywords=_as("invert.skip")),
    Param("source_guidance_scale", "float",
          f"classifier-free guidance of the source prompt, in the inversion and (by default) the edit, in "
          f"[0, {MAX_GUIDANCE_SCALE:g}]",
          check=None, bounds=_fixed(Range(0, MAX_GUIDANCE_SCALE)),
          default=_edit_default("source_guidance_scale"), keywords=_as("invert.source_guidance_scale")),
    # The edit's guidance defaults to the inversion's: only then is the image without edits the input itself.
    dataclasses.replace(_BY_NAME["guidance_scale"], default=None, default_from="source_guidance_scale",
                        doc="classifier-free guidance of the edit (default: source_guidance_scale, which "
                            "reconstructs the image exactly)"),
    _BY_NAME["momentum_scale"],
    _BY_NAME["momentum_beta"],
    dataclasses.replace(_BY_NAME["mask"], default=_edit_default("mask")),
    _BY_NAME["model"],
)

# Every endpoint's parameters, by API name.
ENDPOINTS: dict[str, tuple[Param, ...]] = {"generate": GENERATE_PARAMS, "edit": EDIT_PARAMS}


def defaults(loaded: LoadedModel, endpoint: str = "generate") -> dict:
    """What every optional parameter takes when it is not given (the UI starts with the same values).

    The seed's default is random per request, so it shows here as None.
    """
    params = ENDPOINTS[endpoint]
    values = {p.name: None if p.default in (None, _random_seed) else p.default(loaded) for p in params}
    return {p.name: values[p.default_from] if p.default_from else values[p.name] for p in params}


@dataclass(frozen=True)
class GenerationParams:
    """A validated request: every parameter of its endpoint filled in, enough to reproduce its images.

    The values are read as attributes (``params.steps``, ``params.concepts``). Picklable (ZeroGPU sends it to a
    worker process): the declarations are found by the endpoint's name.
    """

    values: Mapping[str, Any]
    model: str = ""
    notices: tuple[str, ...] = field(default=(), compare=False)
    endpoint: str = "generate"

    def __getattr__(self, name: str):
        # Only called for names that are not fields; "values" is missing while unpickling.
        values = self.__dict__.get("values")
        if values is None or name not in values:
            raise AttributeError(name)
        return values[name]

    @property
    def declarations(self) -> tuple[Param, ...]:
        return ENDPOINTS[self.endpoint]

    def api_kwargs(self) -> dict:
        """The endpoint's named parameters, every one filled in, as JSON values."""
        return {p.name: p.to_json(self.values[p.name]) for p in self.declarations}

    def to_json(self) -> dict:
        """The parameters actually used, the model's id included."""
        return self.api_kwargs()

    def pipeline_keywords(self, call: str = "pipe") -> dict[str, Keyword]:
        """The library call (``"pipe"`` or ``"invert"``) that gives this request's images, keyword by keyword."""
        keywords = [k for p in self.declarations for k in p.keywords(self.values[p.name])]
        keywords += APP_KEYWORDS
        return {k.name: k for k in keywords if k.call == call}


def _notices_across_fields(values: Mapping[str, Any]) -> list[str]:
    notices = []
    # An edit of an uploaded image runs the steps that skip leaves; warmup counts from the first of them.
    steps = performed_steps(values["steps"], values["skip"]) if "skip" in values else values["steps"]
    for i, concept in enumerate(values.get("concepts", ())):
        if concept.warmup >= steps:
            notices.append(f"concepts[{i}] ({concept.prompt!r}) is never applied: its warmup {concept.warmup} "
                           f"is not below the {steps} steps{' that skip leaves' if 'skip' in values else ''}.")
    if values.get("concepts") and values["guidance_scale"] <= 1:
        notices.append(f"guidance_scale {values['guidance_scale']:g} <= 1 turns classifier-free guidance off: both "
                       "images follow the prompt alone (any value from 0 to 1 gives the same pair), and the edits "
                       "are added to the image with edits.")
    return notices


Served = LoadedModel | Mapping[str, LoadedModel]


def served_models(served: Served) -> dict[str, LoadedModel]:
    """The models an app serves, by the id a request names them with (the first is the default)."""
    return dict(served) if isinstance(served, Mapping) else {served.model_id: served}


def limits_for(loaded: LoadedModel, limits: Limits | Mapping[str, Limits] | None = None) -> Limits:
    """The limits a request on ``loaded`` is checked against: ``limits`` itself, or its entry for the model, or
    (None) the environment's, on ZeroGPU with the model profile's defaults."""
    if isinstance(limits, Limits):
        return limits
    if limits is not None and loaded.model_id in limits:
        return limits[loaded.model_id]
    return Limits.from_env(zero_gpu_limits=loaded.profile.zero_gpu_limits)


def parse_request(served: Served, raw: Mapping, limits: Limits | Mapping[str, Limits] | None = None,
                  endpoint: str = "generate", upload_roots: tuple[str, ...] = ()) -> GenerationParams:
    """Validate an API/UI request (a dict with the endpoint's parameter names; None means "the default").

    ``served``: the loaded model, or the served models by id (``model`` chooses one; default: the first).
    ``limits``: one :class:`Limits` for every model, or per model id (see :func:`limits_for`).
    ``upload_roots`` are the folders an uploaded image may be read from (gradio's upload cache). Raises
    :class:`InvalidInput` with a message that names the field and what it accepts.
    """
    models = served_models(served)
    first = next(iter(models.values()))
    # The model first: every other parameter's bounds and defaults are that model's.
    choice = _BY_NAME["model"].validate(first.model_id if raw.get("model") is None else raw["model"],
                                        Context(first, Limits(), served=tuple(models)))
    loaded = models[choice]
    ctx = Context(loaded, limits_for(loaded, limits), tuple(str(r) for r in upload_roots), endpoint,
                  served=tuple(models))
    # Then the mask: it chooses the preset table that fills the concepts.
    mask = next(p for p in ENDPOINTS[endpoint] if p.name == "mask")
    ctx.mask = mask.validate(mask.default(loaded) if raw.get("mask") is None else raw["mask"], ctx)
    values = {}
    for p in ENDPOINTS[endpoint]:
        value = raw.get(p.name)
        if value is None:
            if p.default_from is not None:
                values[p.name] = values[p.default_from]
                continue
            if p.default is None:
                raise InvalidInput(f"{p.name} is required")
            value = p.default(loaded)
        values[p.name] = p.validate(value, ctx)
    ctx.notices += _notices_across_fields(values)
    return GenerationParams(values=values, model=loaded.model_id, notices=tuple(ctx.notices), endpoint=endpoint)


def params_from_json(served: Served, used: Mapping, limits: Limits | Mapping[str, Limits] | None = None,
                     endpoint: str = "generate") -> GenerationParams:
    """The request behind a "parameters used" JSON (as :func:`server.service.generate` returns it)."""
    return parse_request(served, {p.name: used.get(p.name) for p in ENDPOINTS[endpoint]}, limits, endpoint)
