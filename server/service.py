"""Everything the app does besides its UI: request validation, presets, generation, GPU time, "as code".

The app (``app.py``) and its public API both go through :func:`parse_request` and :func:`generate`, so a
request from the browser and one from ``gradio_client`` are checked and run the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import secrets
import tempfile
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import PIL.Image
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from sega.concepts import EditConcept, check_number, show_value
from sega.demo.shapes import DEFAULT_MODEL_DIR

from .loading import LoadedModel
from .profiles import defaults_for, presets_for

MAX_SEED = 2**32 - 1
SCHEDULERS = {"DDIM": DDIMScheduler, "DPM-Solver++": DPMSolverMultistepScheduler, "Euler": EulerDiscreteScheduler}
DEFAULT_SCHEDULER = "DDIM"
CONCEPT_KEYS = ("prompt", "scale", "threshold", "warmup", "reverse", "cooldown", "weight", "preset")
API_PARAMS = ("prompt", "concepts", "seed", "steps", "guidance_scale", "negative_prompt", "width", "height",
              "momentum_scale", "momentum_beta")
MAX_GUIDANCE_SCALE = 30.0
MAX_MOMENTUM_SCALE = 10.0


class InvalidInput(ValueError):
    """A request parameter is not acceptable; the message names it and what is allowed."""


class GenerationStopped(Exception):
    """The request was stopped (Stop, a cancelled API call, a closed page); raised from a step callback."""


# ----------------------------------------------------------------------------------------------
# Limits and defaults
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


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on a request; set with SEGA_MAX_STEPS, SEGA_MAX_SIZE, SEGA_MAX_CONCEPTS and
    SEGA_MAX_PROMPT_CHARS (on a ZeroGPU Space the defaults are lower: ``server.gpu.ZERO_GPU_LIMITS``)."""

    max_steps: int = 100
    max_size: int = 1024
    max_concepts: int = 6
    max_prompt_chars: int = 1000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Limits:
        from . import gpu

        env = os.environ if env is None else env
        base = cls(**gpu.ZERO_GPU_LIMITS) if gpu.on_zero_gpu(env) else cls()
        return cls(
            max_steps=_env_int(env, "SEGA_MAX_STEPS", base.max_steps),
            max_size=_env_int(env, "SEGA_MAX_SIZE", base.max_size),
            max_concepts=_env_int(env, "SEGA_MAX_CONCEPTS", base.max_concepts),
            max_prompt_chars=_env_int(env, "SEGA_MAX_PROMPT_CHARS", base.max_prompt_chars),
        )


def queue_settings(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(queue size, concurrency)`` from SEGA_QUEUE_SIZE (requests that may wait, default 32) and
    SEGA_CONCURRENCY (generations that run at the same time; default 1, on ZeroGPU
    ``server.gpu.ZERO_GPU_CONCURRENCY``, as each call there runs in its own worker)."""
    from . import gpu

    env = os.environ if env is None else env
    concurrency = gpu.ZERO_GPU_CONCURRENCY if gpu.on_zero_gpu(env) else 1
    return _env_int(env, "SEGA_QUEUE_SIZE", 32), _env_int(env, "SEGA_CONCURRENCY", concurrency)


def native_size(loaded: LoadedModel) -> int:
    """The model's training resolution in pixels (512 for SD 1.5, 32 for the demo model)."""
    return int(loaded.pipe.unet.config.sample_size * loaded.pipe.vae_scale_factor)


def min_size(loaded: LoadedModel) -> int:
    """The smallest image the UNet can take: one latent pixel after its last downsampling."""
    pipe = loaded.pipe
    return max(8, int(pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)))


def model_fingerprint(loaded: LoadedModel) -> str:
    """A short id of the served weights (model id plus a few UNet weights), e.g. to keep caches apart."""
    sample = loaded.pipe.unet.conv_in.weight.detach().flatten()[:256].float().cpu().numpy().tobytes()
    return hashlib.sha256(loaded.model_id.encode() + sample).hexdigest()[:12]


def ui_defaults(loaded: LoadedModel) -> dict:
    """What every optional parameter takes when it is not given (the UI starts with the same values)."""
    d = defaults_for(loaded.is_demo)
    size = native_size(loaded)
    return {
        "negative_prompt": "",
        "concepts": [],
        "steps": d["steps"],
        "guidance_scale": d["guidance_scale"],
        "width": size,
        "height": size,
        "momentum_scale": d["momentum_scale"],
        "momentum_beta": d["momentum_beta"],
        "scheduler": DEFAULT_SCHEDULER,
    }


def concept_defaults(loaded: LoadedModel, preset: str | None = None) -> dict:
    """Every key of a concept but its text, from ``preset`` (default: the model's default preset)."""
    presets = presets_for(loaded.is_demo)
    name = preset or defaults_for(loaded.is_demo)["default_preset"]
    return {"preset": name, **presets[name], "reverse": False, "cooldown": None, "weight": 1.0}


def save_png(image: PIL.Image.Image | None, cache_dir: str) -> str | None:
    """``image`` as a PNG in ``cache_dir``, named by its content, written atomically.

    Gradio's own PIL saving rewrites an existing file in place, so when two requests make the same image
    (a re-edit's original) one visitor could download it half-written; a rename never exposes that.
    """
    if image is None:
        return None
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    folder = os.path.join(cache_dir, "sega-" + hashlib.sha256(data).hexdigest()[:32])
    path = os.path.join(folder, "image.png")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=folder, prefix=".image.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staging, path)
    return path


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _number(name: str, value, low: float, high: float, *, integer: bool = False,
            high_inclusive: bool = True) -> float | int:
    """``value`` as a finite number in range, or InvalidInput naming ``name`` and the allowed range."""
    try:
        return check_number(name, value, low, high, integer=integer, high_inclusive=high_inclusive)
    except ValueError as e:
        raise InvalidInput(str(e)) from None


def clean_text(name: str, value, max_chars: int) -> tuple[str, list[str]]:
    """Text without control characters (tabs and newlines become spaces), stripped; with notices."""
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidInput(f"{name} must be at most {max_chars} characters, got {len(value)}")
    notices = []
    kept = []
    removed = 0
    for ch in value:
        if unicodedata.category(ch) == "Cc":
            removed += 1
            if ch in "\t\n\r":
                kept.append(" ")
        else:
            kept.append(ch)
    if removed:
        notices.append(f"{name}: removed {removed} control character(s).")
    return "".join(kept).strip(), notices


def _truncation_notice(loaded: LoadedModel, name: str, text: str) -> list[str]:
    if not text:
        return []
    dropped = loaded.pipe.truncated_text(text)
    if not dropped:
        return []
    limit = loaded.pipe.tokenizer.model_max_length
    return [f"{name} is longer than the model's {limit}-token limit; this part was ignored: {dropped!r}."]


@dataclass(frozen=True)
class GenerationParams:
    """A validated request: everything needed to reproduce one pair of images."""

    prompt: str
    negative_prompt: str
    concepts: tuple[EditConcept, ...]
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    momentum_scale: float
    momentum_beta: float
    scheduler: str = DEFAULT_SCHEDULER
    model: str = ""
    notices: tuple[str, ...] = field(default=(), compare=False)

    def api_kwargs(self) -> dict:
        """The public API's named parameters, every one filled in."""
        return {
            "prompt": self.prompt,
            "concepts": [dataclasses.asdict(c) for c in self.concepts],
            "seed": self.seed,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "momentum_scale": self.momentum_scale,
            "momentum_beta": self.momentum_beta,
        }

    def to_json(self) -> dict:
        """The parameters actually used: the API's, plus the scheduler and model (chosen by the server)."""
        return {**self.api_kwargs(), "scheduler": self.scheduler, "model": self.model}


def parse_concept(loaded: LoadedModel, index: int, raw, limits: Limits) -> tuple[EditConcept, list[str]]:
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
    text, notices = clean_text(f"{where}.prompt", raw["prompt"], limits.max_prompt_chars)
    if not text:
        raise InvalidInput(f"{where}.prompt must be non-empty text")
    presets = presets_for(loaded.is_demo)
    preset = raw.get("preset")
    if preset is not None and (not isinstance(preset, str) or preset not in presets):
        raise InvalidInput(f"{where}.preset must be one of {', '.join(presets)}; got {show_value(preset)}")
    values = concept_defaults(loaded, preset)
    values.pop("preset")
    values.update({k: v for k, v in raw.items() if k not in ("prompt", "preset") and v is not None})
    try:
        concept = EditConcept(prompt=text, **values)
    except ValueError as exc:
        raise InvalidInput(f"{where}.{exc}") from None
    return concept, notices + _truncation_notice(loaded, f"{where}.prompt", text)


def parse_request(loaded: LoadedModel, raw: Mapping, limits: Limits | None = None) -> GenerationParams:
    """Validate an API/UI request (a dict with the API's parameter names; None means "the default").

    Raises :class:`InvalidInput` with a message that names the field and what it accepts.
    """
    limits = limits or Limits.from_env()
    defaults = ui_defaults(loaded)

    def get(name: str):
        value = raw.get(name)
        return defaults[name] if value is None else value

    if raw.get("prompt") is None:
        raise InvalidInput("prompt is required")
    prompt, notices = clean_text("prompt", raw["prompt"], limits.max_prompt_chars)
    if not prompt:
        raise InvalidInput("prompt must be non-empty text")
    notices += _truncation_notice(loaded, "prompt", prompt)
    negative, neg_notices = clean_text("negative_prompt", get("negative_prompt"), limits.max_prompt_chars)
    notices += neg_notices + _truncation_notice(loaded, "negative_prompt", negative)

    seed = raw.get("seed")
    seed = secrets.randbelow(MAX_SEED + 1) if seed is None else _number("seed", seed, 0, MAX_SEED, integer=True)
    steps = _number("steps", get("steps"), 1, limits.max_steps, integer=True)
    guidance = _number("guidance_scale", get("guidance_scale"), 0, MAX_GUIDANCE_SCALE)
    low = min_size(loaded)
    sizes = {}
    for name in ("width", "height"):
        value = _number(name, get(name), low, limits.max_size, integer=True)
        if value % 8:
            raise InvalidInput(f"{name} must be a multiple of 8 in [{low}, {limits.max_size}], got {value}")
        sizes[name] = value
    momentum_scale = _number("momentum_scale", get("momentum_scale"), 0, MAX_MOMENTUM_SCALE)
    momentum_beta = _number("momentum_beta", get("momentum_beta"), 0, 1, high_inclusive=False)
    scheduler = get("scheduler")
    if scheduler not in SCHEDULERS:
        raise InvalidInput(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {scheduler!r}")

    raw_concepts = get("concepts")
    if not isinstance(raw_concepts, (list, tuple)):
        raise InvalidInput(f"concepts must be a list of objects (up to {limits.max_concepts}), "
                           f"got {type(raw_concepts).__name__}")
    if len(raw_concepts) > limits.max_concepts:
        raise InvalidInput(f"concepts may hold at most {limits.max_concepts} concepts, got {len(raw_concepts)}")
    concepts = []
    for i, item in enumerate(raw_concepts):
        concept, concept_notices = parse_concept(loaded, i, item, limits)
        concepts.append(concept)
        notices += concept_notices
        if concept.warmup >= steps:
            notices.append(f"concepts[{i}] ({concept.prompt!r}) is never applied: its warmup {concept.warmup} "
                           f"is not below the {steps} steps.")
    if concepts and guidance <= 1:
        notices.append(f"guidance_scale {guidance:g} <= 1 turns classifier-free guidance off; the edits are "
                       "applied to the unconditional estimate.")
    return GenerationParams(
        prompt=prompt, negative_prompt=negative, concepts=tuple(concepts), seed=seed, steps=steps,
        guidance_scale=guidance, width=sizes["width"], height=sizes["height"], momentum_scale=momentum_scale,
        momentum_beta=momentum_beta, scheduler=scheduler, model=loaded.model_id, notices=tuple(notices),
    )


def params_from_json(loaded: LoadedModel, used: Mapping, limits: Limits | None = None) -> GenerationParams:
    """The request behind a "parameters used" JSON (as :func:`generate` returns it)."""
    return parse_request(loaded, {k: used.get(k) for k in (*API_PARAMS, "scheduler")}, limits)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    original: PIL.Image.Image | None  # None when the safety checker flagged it
    edited: PIL.Image.Image | None
    used: dict
    summary: str
    cache_hit: bool
    seconds: float


def make_scheduler(name: str, config):
    """A fresh scheduler of the named kind, built from the model's own scheduler config."""
    return SCHEDULERS[name].from_config(config)


def describe_concept(c: EditConcept) -> str:
    sign = "−" if c.reverse else "+"
    extra = f", until step {c.cooldown}" if c.cooldown is not None else ""
    extra += f", weight {c.weight:g}" if c.weight != 1 else ""
    return f"{sign}{c.prompt!r} (scale {c.scale:g}, threshold {c.threshold:g}, from step {c.warmup}{extra})"


def summarize(params: GenerationParams, seconds: float, cache_hit: bool, extra: list[str] = ()) -> str:
    edits = "; ".join(describe_concept(c) for c in params.concepts) or "no edits"
    line = (f"{edits} · seed {params.seed} · {params.steps} steps {params.scheduler} · "
            f"{params.width}×{params.height} px · guidance {params.guidance_scale:g} · {seconds:.1f} s")
    if cache_hit:
        line += " · image without edits reused from cache"
    notes = [*params.notices, *extra]
    return line + ("  Note: " + " ".join(notes) if notes else "")


def generate(loaded: LoadedModel, params: GenerationParams,
             progress_callback: Callable[[int, int], None] | None = None) -> GenerationResult:
    """Run the pipeline once: the image without edits and the image with edits for ``params.seed``.

    ``progress_callback(done, total)`` is called after every step; it stops the run by raising (e.g.
    :class:`GenerationStopped`), which this request's pipeline call passes on.
    """
    pipe = loaded.pipe

    def on_step_end(_pipe, i: int, _t, tensors: dict) -> dict:
        # Stop per request by raising here, never with pipe._interrupt: that flag is shared by every request.
        if progress_callback is not None:
            progress_callback(i + 1, params.steps)
        return tensors

    start = time.perf_counter()
    out = pipe(
        params.prompt,
        negative_prompt=params.negative_prompt or None,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        height=params.height,
        width=params.width,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        # None rather than []: no concepts means a plain Stable Diffusion run
        concepts=list(params.concepts) or None,
        edit_momentum_scale=params.momentum_scale,
        edit_mom_beta=params.momentum_beta,
        return_original=True,
        # The answer must not depend on what earlier visitors left in the re-edit cache.
        original_first=True,
        scheduler=make_scheduler(params.scheduler, pipe.scheduler.config),
        callback_on_step_end=on_step_end,
        output_type="pil",
    )
    seconds = time.perf_counter() - start
    original, edited = out.original_images[0], out.images[0]
    flagged = []
    if out.original_nsfw_content_detected and out.original_nsfw_content_detected[0]:
        original = None
        flagged.append("The image without edits was flagged by the safety checker and is not shown.")
    if out.nsfw_content_detected and out.nsfw_content_detected[0]:
        edited = None
        flagged.append("The image with edits was flagged by the safety checker and is not shown.")
    summary = summarize(params, seconds, out.cache_hit, flagged)
    # Notices (truncation, removed control characters...) and the summary travel with the result, for API
    # callers too.
    used = {**params.to_json(), "notices": [*params.notices, *flagged], "summary": summary,
            "cache_hit": bool(out.cache_hit)}
    return GenerationResult(original=original, edited=edited, used=used, summary=summary,
                            cache_hit=bool(out.cache_hit), seconds=seconds)


def gpu_duration(steps: int, n_concepts: int, width: int, height: int) -> int:
    """Seconds to reserve on a ZeroGPU Space for one request (``@spaces.GPU(duration=...)``).

    Per step the UNet sees 2 samples for the image without edits and 2 + n_concepts for the edited one
    (fewer before the first warmup ends); about 20 ms per 512x512 sample on a ZeroGPU H200 in fp16, doubled
    for headroom, plus a fixed allowance for text encoding, decoding, the safety checker and start-up.
    """
    samples_per_step = 2 + (2 + n_concepts if n_concepts else 0)
    area = max(width * height / 512**2, 1 / 16)
    estimate = 10 + steps * samples_per_step * 0.04 * area
    return int(min(max(math.ceil(estimate), 15), 300))


# ----------------------------------------------------------------------------------------------
# "As code"
# ----------------------------------------------------------------------------------------------


def _py(value) -> str:
    """A Python literal for JSON-like values (repr escapes any text safely)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    return repr(value)


def as_code(params: GenerationParams, url: str = "http://127.0.0.1:7860/") -> tuple[str, str]:
    """Two snippets that reproduce ``params``: a ``gradio_client`` call to this app, and the library call."""
    kwargs = params.api_kwargs()
    lines = [f"    {k}={_py(v)}," for k, v in kwargs.items() if k != "concepts"]
    concept_lines = ["    concepts=["] + [f"        {_py(c)}," for c in kwargs["concepts"]] + ["    ],"]
    lines[1:1] = concept_lines
    scheduler_note = ""
    if params.scheduler != DEFAULT_SCHEDULER:
        scheduler_note = (f"# The API always samples with {DEFAULT_SCHEDULER}; this result used {params.scheduler}, "
                          "which the library snippet reproduces.\n")
    client = (
        "from gradio_client import Client\n\n"
        f"client = Client({url!r})\n"
        f"{scheduler_note}"
        "original, edited, used = client.predict(\n"
        + "\n".join(lines)
        + '\n    api_name="/generate",\n)\n'
        "print(original)\nprint(edited)\n"
    )

    bundled = params.model in ("", str(DEFAULT_MODEL_DIR))
    model_expr = "DEFAULT_MODEL_DIR" if bundled else repr(params.model)
    concept_code = "\n".join(
        "        EditConcept(" + ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(c).items()) + "),"
        for c in params.concepts
    )
    sched = SCHEDULERS[params.scheduler].__name__
    lines = [
        "import torch",
        f"from diffusers import {sched}",
        "",
        "from sega import EditConcept, SegaPipeline",
        *(["from sega.demo.shapes import DEFAULT_MODEL_DIR"] if bundled else []),
        "",
        "# float32 on the CPU; on a GPU use dtype=torch.float16 and pipe.to(\"cuda\") (as the app does there)",
        f"pipe = SegaPipeline.from_pretrained({model_expr}, dtype=torch.float32)",
        "out = pipe(",
        f"    {params.prompt!r},",
        f"    negative_prompt={params.negative_prompt or None!r},",
        f"    num_inference_steps={params.steps},",
        f"    guidance_scale={params.guidance_scale!r},",
        f"    width={params.width},",
        f"    height={params.height},",
        f"    generator=torch.Generator(\"cpu\").manual_seed({params.seed}),",
        *(["    concepts=[", concept_code, "    ],"] if concept_code else []),
        f"    edit_momentum_scale={params.momentum_scale!r},",
        f"    edit_mom_beta={params.momentum_beta!r},",
        f"    scheduler={sched}.from_config(pipe.scheduler.config),",
        "    return_original=True,",
        "    original_first=True,",
        ")",
        "out.original_images[0].save(\"original.png\")",
        "out.images[0].save(\"edited.png\")",
    ]
    return client, "\n".join(lines) + "\n"
