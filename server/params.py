"""The public API's parameters, declared once.

Each :class:`Param` says how its raw value is checked, what it defaults to on the served model, and which
keywords of the library call it becomes. Everything else derives from this table: request validation
(:func:`parse_request`), the defaults the UI and the API start with (:func:`defaults`), the JSON of the
parameters used, the pipeline call that :func:`server.service.generate` executes and the two "as code" snippets
(:mod:`server.snippets`), which render the very same keyword mapping as text.

Adding a parameter to ``/generate`` means adding a :class:`Param` to :data:`GENERATE_PARAMS` and, if the UI shows
it, a widget in ``app.py``. The checks and keywords it uses live by kind: text (:mod:`server.text`), concepts
(:mod:`server.concepts`), the uploaded image (:mod:`server.uploads`), library keywords (:mod:`server.keywords`),
limits (:mod:`server.limits`).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sega.attention import quarter_resolution_layers
from sega.concepts import EditConcept, Range, show_value
from sega.inversion import performed_steps
from sega.masks import MASK_MODES

from .concepts import check_concepts
from .context import Context
from .errors import InvalidInput
from .keywords import (
    APP_KEYWORDS,
    SCHEDULERS,
    Keyword,
    concepts_keyword,
    generator_keyword,
    literal_keywords,
    mask_keyword,
    scheduler_keyword,
)
from .limits import Limits, limits_for
from .loading import LoadedModel, ModelFacts
from .profiles import ModelProfile, profile_named
from .text import text
from .uploads import UploadedImage, check_image, image_keyword

MAX_SEED = 2**32 - 1
MAX_GUIDANCE_SCALE = 30.0
MAX_MOMENTUM_SCALE = 10.0
DEFAULT_SCHEDULER = "DDIM"
T = TypeVar("T")


def _steps(model: LoadedModel | ModelFacts, limits: Limits) -> Range:
    # More steps than the scheduler has training timesteps cannot be sampled; say so here, not in the worker.
    return Range(1, min(limits.max_steps, model.train_timesteps), integer=True)


def _size(model: LoadedModel | ModelFacts, limits: Limits) -> Range:
    return Range(model.min_size, limits.max_size, integer=True, multiple_of=model.size_multiple)


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
          check=lambda v, ctx: text("prompt", v, ctx, required=True), default=None, keywords=literal_keywords("prompt")),
    Param("concepts", "json", "edit concepts: objects with prompt (required), scale, threshold, warmup, reverse, "
          "cooldown, weight, preset; a preset fills the keys not given (with a mask: from the model's presets for "
          "masks, where it has them)",
          check=check_concepts, default=lambda _loaded: [], keywords=concepts_keyword,
          to_json=lambda concepts: [dataclasses.asdict(c) for c in concepts]),
    Param("seed", "int", f"random seed in [0, {MAX_SEED}] (default: random, returned in the JSON)",
          check=None, bounds=_fixed(Range(0, MAX_SEED, integer=True)), default=_random_seed,
          keywords=generator_keyword),
    Param("steps", "int", "denoising steps", check=None, bounds=_steps, default=_profile_default("steps"),
          keywords=literal_keywords("num_inference_steps")),
    Param("guidance_scale", "float", f"classifier-free guidance in [0, {MAX_GUIDANCE_SCALE:g}]",
          check=None, bounds=_fixed(Range(0, MAX_GUIDANCE_SCALE)),
          default=_profile_default("guidance_scale"), keywords=literal_keywords("guidance_scale")),
    Param("negative_prompt", "text", "what the image should not show",
          check=lambda v, ctx: text("negative_prompt", v, ctx), default=_empty_text,
          keywords=literal_keywords("negative_prompt", convert=lambda v: v or None)),
    Param("width", "int", "width in pixels, a multiple of 8 (FLUX: 16)", check=None, bounds=_size, default=_native_size,
          keywords=literal_keywords("width")),
    Param("height", "int", "height in pixels, a multiple of 8 (FLUX: 16)", check=None, bounds=_size, default=_native_size,
          keywords=literal_keywords("height")),
    Param("momentum_scale", "float", f"SEGA momentum scale in [0, {MAX_MOMENTUM_SCALE:g}]",
          check=None, bounds=_fixed(Range(0, MAX_MOMENTUM_SCALE)),
          default=_profile_default("momentum_scale"), keywords=literal_keywords("edit_momentum_scale")),
    Param("momentum_beta", "float", "SEGA momentum beta in [0, 1)",
          check=None, bounds=_fixed(Range(0, 1, high_inclusive=False)),
          default=_profile_default("momentum_beta"), keywords=literal_keywords("edit_mom_beta")),
    Param("scheduler", "text", f"sampler: {', '.join(SCHEDULERS)}", check=_scheduler,
          default=lambda _loaded: DEFAULT_SCHEDULER, keywords=scheduler_keyword),
    Param("mask", "text", MASK_DOC, check=_mask, default=_profile_default("mask"), keywords=mask_keyword),
    # Which served model runs the request: its own limits, presets and defaults apply (the library snippet
    # loads it with from_pretrained, so it adds no keyword).
    Param("model", "text", "which of the served models (hub id or folder, as the JSON's model says; default: "
          "the first served)", check=_model, default=_model_id, keywords=lambda _model: []),
)
API_PARAMS: tuple[str, ...] = tuple(p.name for p in GENERATE_PARAMS)
def _edit_default(key: str) -> Callable[[LoadedModel], Any]:
    return lambda loaded: loaded.profile.edit_defaults[key]


_BY_NAME = {p.name: p for p in GENERATE_PARAMS}
# The order is /edit's positional order. The inversion and the edit share the source prompt, the steps and the
# seed; concepts, guidance and momentum act in the edit, as in /generate.
EDIT_PARAMS: tuple[Param, ...] = (
    Param("image", "file", "the image to edit: PNG, JPEG or WebP (gradio_client.handle_file(path))",
          check=check_image, default=None, keywords=image_keyword, to_json=UploadedImage.to_json,
          client_source=lambda upload: f"handle_file({upload['name']!r})"),
    Param("source_prompt", "text", "what the image shows (optional; empty works too)",
          check=lambda v, ctx: text("source_prompt", v, ctx), default=_empty_text,
          keywords=literal_keywords("prompt", "invert.source_prompt")),
    _BY_NAME["concepts"],
    dataclasses.replace(_BY_NAME["seed"], doc="random seed of the inversion's noise (default: random)",
                        keywords=lambda seed: generator_keyword(seed, "invert")),
    dataclasses.replace(_BY_NAME["steps"], default=_edit_default("steps"),
                        keywords=literal_keywords("invert.num_inference_steps")),
    Param("skip", "float", "how much of the image to keep, in [0, 1): the share of the first denoising steps "
          "skipped; more keeps more of the original",
          check=None, bounds=_fixed(Range(0, 1, high_inclusive=False)), default=_edit_default("skip"),
          keywords=literal_keywords("invert.skip")),
    Param("source_guidance_scale", "float",
          f"classifier-free guidance of the source prompt, in the inversion and (by default) the edit, in "
          f"[0, {MAX_GUIDANCE_SCALE:g}]",
          check=None, bounds=_fixed(Range(0, MAX_GUIDANCE_SCALE)),
          default=_edit_default("source_guidance_scale"), keywords=literal_keywords("invert.source_guidance_scale")),
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

    The seed's default is random per request, so it shows here as None; so do the parameters the model does
    not use (its profile's ``unused_params``).
    """
    params = ENDPOINTS[endpoint]
    unused = loaded.profile.unused_params
    values = {p.name: None if p.default in (None, _random_seed) or p.name in unused else p.default(loaded)
              for p in params}
    return {p.name: values[p.default_from] if p.default_from else values[p.name] for p in params}


class Declared(Generic[T]):
    """A declared parameter's value read as an attribute of :class:`GenerationParams` (``params.steps``): a
    typed view of ``params.values``, named by the attribute, which tooling sees (unlike ``__getattr__``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, params: GenerationParams | None, owner: type | None = None) -> T:
        if params is None:
            return self  # type: ignore[return-value]  # the descriptor itself, on the class
        return params.values[self.name]


@dataclass(frozen=True)
class GenerationParams:
    """A validated request: every parameter of its endpoint filled in, enough to reproduce its images.

    ``values`` holds every declared parameter by name; :class:`Declared` attributes read the ones the server's
    code uses. Picklable (ZeroGPU sends it
    to a worker process): the declarations are found by the endpoint's name.
    """

    values: Mapping[str, Any]
    model: str = ""
    notices: tuple[str, ...] = field(default=(), compare=False)
    endpoint: str = "generate"
    profile: str = ""  # the model's profile, by name (server.profiles.profile_named); "" for none

    # Typed views of the declared parameters the server's code reads (each must name one: a test checks).
    seed = Declared[int]()
    steps = Declared[int]()
    concepts = Declared[tuple[EditConcept, ...]]()
    guidance_scale = Declared[float]()
    scheduler = Declared[str]()
    width = Declared[int]()  # /generate's size (an edit's is its image's)
    height = Declared[int]()
    image = Declared[UploadedImage]()  # /edit's
    skip = Declared[float]()  # /edit's

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
        # A parameter the model does not use is None, and adds no keyword; the model's own keywords come last.
        keywords = [k for p in self.declarations if self.values[p.name] is not None
                    for k in p.keywords(self.values[p.name])]
        keywords += APP_KEYWORDS
        if self.profile:
            keywords += [Keyword.literal(name, value)
                         for name, value in profile_named(self.profile).library_keywords.items()]
        return {k.name: k for k in keywords if k.call == call}


def _notices_across_fields(values: Mapping[str, Any], profile: ModelProfile) -> list[str]:
    notices = []
    # An edit of an uploaded image runs the steps that skip leaves; warmup counts from the first of them.
    steps = performed_steps(values["steps"], values["skip"]) if "skip" in values else values["steps"]
    for i, concept in enumerate(values.get("concepts", ())):
        if concept.warmup >= steps:
            notices.append(f"concepts[{i}] ({concept.prompt!r}) is never applied: its warmup {concept.warmup} "
                           f"is not below the {steps} steps{' that skip leaves' if 'skip' in values else ''}.")
    if values.get("concepts") and profile.classifier_free_guidance and values["guidance_scale"] <= 1:
        notices.append(f"guidance_scale {values['guidance_scale']:g} <= 1 turns classifier-free guidance off: both "
                       "images follow the prompt alone (any value from 0 to 1 gives the same pair), and the edits "
                       "are added to the image with edits.")
    return notices


# Why a model may not use a parameter (server.profiles.ModelProfile.unused_params), for the API's refusal.
UNUSED_REASONS = {
    "negative_prompt": "FLUX runs without true classifier-free guidance here, so it takes no negative prompt",
    "scheduler": "FLUX keeps its own flow-matching scheduler",
    "mask": "implicit masks come from a UNet's cross-attention, which FLUX does not have",
    "guidance_scale": "this model has no guidance embedding (FLUX.1-schnell), so a guidance scale would be ignored",
}

Served = LoadedModel | Mapping[str, LoadedModel]


def served_models(served: Served) -> dict[str, LoadedModel]:
    """The models an app serves, by the id a request names them with (the first is the default)."""
    return dict(served) if isinstance(served, Mapping) else {served.model_id: served}


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
    profile = loaded.profile
    if endpoint == "edit" and not profile.edits_uploads:
        raise InvalidInput(f"Editing an uploaded image needs a Stable Diffusion or SDXL model; {loaded.model_id} is "
                           f"a {profile.name} model, which /edit does not support. Use /generate with it.")
    # Left out, empty, or mask "none" (no mask): what a request that does not use them sends.
    unused = sorted(name for name in profile.unused_params
                    if raw.get(name) not in (None, "") and not (name == "mask" and raw[name] == "none"))
    if unused:
        raise InvalidInput(f"the model {loaded.model_id} ({profile.name}) does not use "
                           + "; ".join(f"{name}: {UNUSED_REASONS[name]}" for name in unused)
                           + ". Leave it out.")
    # Then the mask: it chooses the preset table that fills the concepts.
    mask = next(p for p in ENDPOINTS[endpoint] if p.name == "mask")
    if "mask" not in profile.unused_params:
        ctx.mask = mask.validate(mask.default(loaded) if raw.get("mask") is None else raw["mask"], ctx)
    values = {}
    for p in ENDPOINTS[endpoint]:
        value = raw.get(p.name)
        if p.name in profile.unused_params:
            values[p.name] = None
            continue
        if value is None:
            if p.default_from is not None:
                values[p.name] = values[p.default_from]
                continue
            if p.default is None:
                raise InvalidInput(f"{p.name} is required")
            value = p.default(loaded)
        values[p.name] = p.validate(value, ctx)
    ctx.notices += _notices_across_fields(values, loaded.profile)
    return GenerationParams(values=values, model=loaded.model_id, notices=tuple(ctx.notices), endpoint=endpoint,
                            profile=loaded.profile.name)


def params_from_json(served: Served, used: Mapping, limits: Limits | Mapping[str, Limits] | None = None,
                     endpoint: str = "generate") -> GenerationParams:
    """The request behind a "parameters used" JSON (as :func:`server.service.generate` returns it)."""
    return parse_request(served, {p.name: used.get(p.name) for p in ENDPOINTS[endpoint]}, limits, endpoint)
