"""Running a validated request: generation, GPU time, the summary line, and the PNG files handed to gradio.

The app's UI and its public API both validate with :mod:`server.params` and run :func:`generate`, so a request
from the browser and one from ``gradio_client`` are checked and run the same way.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import PIL.Image

from sega.concepts import EditConcept
from sega.inversion import performed_steps
from sega.masks import mean_masks
from sega.previews import preview_images
from sega.stopping import StopFlag

from .images import mask_to_data_url
from .loading import LoadedModel
from .params import GenerationParams
from .profiles import ModelProfile


def model_fingerprint(loaded: LoadedModel) -> str:
    """A short id of the served weights (model id plus a few UNet weights), e.g. to keep caches apart."""
    denoiser = getattr(loaded.pipe, "unet", None) or loaded.pipe.transformer  # FLUX has a transformer
    first = next(denoiser.parameters())
    sample = first.detach().flatten()[:256].float().cpu().numpy().tobytes()
    return hashlib.sha256(loaded.model_id.encode() + sample).hexdigest()[:12]


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
# Generation
# ----------------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    original: PIL.Image.Image | None  # None when the safety checker flagged it
    edited: PIL.Image.Image | None
    used: dict
    summary: str
    inversion_reused: bool  # /edit: the inversion came from the pipeline's inversion cache
    seconds: float


def describe_concept(c: EditConcept) -> str:
    sign = "−" if c.reverse else "+"
    extra = f", until step {c.cooldown}" if c.cooldown is not None else ""
    extra += f", weight {c.weight:g}" if c.weight != 1 else ""
    return f"{sign}{c.prompt!r} (scale {c.scale:g}, threshold {c.threshold:g}, from step {c.warmup}{extra})"


def summarize(params: GenerationParams, seconds: float, inversion_reused: bool = False,
              extra: list[str] = ()) -> str:
    edits = "; ".join(describe_concept(c) for c in params.concepts) or "no edits"
    if params.endpoint == "edit":
        image = params.image.image
        line = (f"{edits} · your image {image.width}×{image.height} px, {params.steps} steps, skip {params.skip:g} · "
                f"seed {params.seed} · guidance {params.guidance_scale:g} · {seconds:.1f} s")
        if inversion_reused:
            line += " · inversion reused from cache"
    else:
        # A setting the model does not use (None: FLUX's scheduler, FLUX.1-schnell's guidance) is not shown.
        scheduler = f" {params.scheduler}" if params.scheduler is not None else ""
        guidance = f" · guidance {params.guidance_scale:g}" if params.guidance_scale is not None else ""
        line = (f"{edits} · seed {params.seed} · {params.steps} steps{scheduler} · "
                f"{params.width}×{params.height} px{guidance} · {seconds:.1f} s")
    notes = [*params.notices, *extra]
    return line + ("  Note: " + " ".join(notes) if notes else "")


def preview_interval(steps: int) -> int:
    """How many denoising steps apart live previews are made: about ten per run."""
    return max(1, math.ceil(steps / 10))


def generate(loaded: LoadedModel, params: GenerationParams, stop: StopFlag | None = None,
             progress_callback: Callable[..., None] | None = None, previews: bool = False) -> GenerationResult:
    """Run the pipeline once: the image without edits and the image with edits for ``params.seed``.

    ``progress_callback(done, total)`` is called after every step that is run: the denoising steps, and for
    /edit first the inversion's (``stage="inversion"`` is passed then); an edit counts n inversion steps plus
    the n denoising steps that ``skip`` leaves (n when the inversion comes from the cache). With ``previews``,
    every :func:`preview_interval` denoising steps but the last it also gets ``preview=``, a PIL image of what
    the image with edits is becoming (:mod:`sega.previews`: a linear map of the latents, the model profile's
    factors), made here, in the process that runs the loop. ``stop`` goes to the library calls as their
    ``stop=``: once it is set they raise ``sega.Stopped`` before their next step.
    """
    pipe = loaded.pipe
    n = performed_steps(params.steps, params.skip) if params.endpoint == "edit" else params.steps
    every = preview_interval(n) if previews else 0
    counted = {"before": 0, "total": n}  # steps reported before the denoising, and the run's total

    def report(done: int, **extra) -> None:
        if progress_callback is not None:
            progress_callback(done, counted["total"], **extra)

    def on_inversion_step(_pipe, k: int, _t, _tensors: dict) -> None:
        report(k + 1, stage="inversion")

    def on_step_end(_pipe, i: int, _t, tensors: dict) -> dict:
        extra = {}
        if every and (i + 1) % every == 0 and i + 1 < n:
            extra["preview"] = preview_images(tensors["pred_original_sample"][:1], None,
                                               loaded.profile.preview_factors, loaded.profile.preview_bias)[0]
        report(counted["before"] + i + 1, **extra)
        return {}

    start = time.perf_counter()
    keywords = {name: keyword.build(pipe) for name, keyword in params.pipeline_keywords("pipe").items()}
    invert = {name: keyword.build(pipe) for name, keyword in params.pipeline_keywords("invert").items()}
    if invert:  # /edit: invert the uploaded image (or take its inversion from the cache), then edit it
        counted["total"] = 2 * n
        keywords["inversion"] = pipe.invert(**invert, stop=stop, callback_on_step_end=on_inversion_step)
        if keywords["inversion"].cache_hit:
            counted["total"] = n  # no inversion step was run
        else:
            counted["before"] = n
    tensors = ["latents", "pred_original_sample"] if every else ["latents"]
    out = pipe(**keywords, stop=stop, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=tensors,
               output_type="pil")
    seconds = time.perf_counter() - start
    original, edited = out.original_images[0], out.images[0]
    flagged = []
    # FLUX's output has no safety checker's flags, no inversion and no masks: read as absent.
    original_flagged = getattr(out, "original_nsfw_content_detected", None)
    edited_flagged = getattr(out, "nsfw_content_detected", None)
    if original_flagged and original_flagged[0]:
        original = None
        flagged.append("The image without edits was flagged by the safety checker and is not shown.")
    if edited_flagged and edited_flagged[0]:
        edited = None
        flagged.append("The image with edits was flagged by the safety checker and is not shown.")
    # "cache_hit" in the JSON: whether /edit's inversion was reused (a /generate call has nothing to reuse).
    inversion_reused = bool(getattr(out, "inversion_cache_hit", False))
    summary = summarize(params, seconds, inversion_reused, flagged)
    # Notices (truncation, removed control characters...) and the summary travel with the result, for API
    # callers too.
    used = {**params.to_json(), "notices": [*params.notices, *flagged], "summary": summary,
            "cache_hit": inversion_reused, "masks": concept_masks(params.concepts, getattr(out, "edit_masks", None))}
    return GenerationResult(original=original, edited=edited, used=used, summary=summary,
                            inversion_reused=inversion_reused, seconds=seconds)


def concept_masks(concepts, edit_masks) -> list[dict]:
    """Per concept, where it edited: its mask averaged over the steps it was applied, at the latent size, as a
    PNG data URL (white = edited at every step); [] without masks (``mask`` "none")."""
    if edit_masks is None:
        return []
    means = mean_masks(edit_masks, [c.warmup for c in concepts], [c.cooldown for c in concepts])
    return [{"concept": c.prompt, "reverse": c.reverse, "mask": mask_to_data_url(means[i, 0].float().cpu().numpy())}
            for i, c in enumerate(concepts)]


def gpu_duration(steps: int, n_concepts: int, width: int, height: int, inversion: bool = False,
                 per_sample: float = 0.04, fixed: float = 10.0, per_image: int = 2) -> int:
    """Seconds to reserve on a ZeroGPU Space for one request (``@spaces.GPU(duration=...)``).

    Per step the UNet sees 2 samples for the image without edits and 2 + n_concepts for the edited one
    (fewer before the first warmup ends), and an inversion 2 more (source prompt and unconditional); about
    20 ms per 512x512 sample on a ZeroGPU H200 in fp16, doubled for headroom, plus a fixed allowance for text
    encoding, decoding, the safety checker and start-up. ``per_sample`` and ``fixed`` are the model's
    (:class:`server.profiles.ModelProfile`; SD 1.5's by default); ``per_image`` the estimates per image, 2 with
    classifier-free guidance, 1 for FLUX's distilled guidance (``ModelProfile.classifier_free_guidance``).
    """
    samples_per_step = per_image + (per_image + n_concepts if n_concepts else 0) + (2 if inversion else 0)
    area = max(width * height / 512**2, 1 / 16)
    estimate = fixed + steps * samples_per_step * per_sample * area
    return int(min(max(math.ceil(estimate), 15), 300))


def gpu_seconds(params: GenerationParams, profile: ModelProfile | None = None) -> int:
    """:func:`gpu_duration` for a request of either endpoint (an edit runs the steps that skip leaves), with
    the served model's costs (``profile``; SD 1.5's when None)."""
    cost = {} if profile is None else {"per_sample": profile.gpu_seconds_per_sample,
                                       "fixed": profile.gpu_fixed_seconds,
                                       "per_image": 2 if profile.classifier_free_guidance else 1}
    if params.endpoint == "edit":
        width, height = params.image.image.size
        steps = performed_steps(params.steps, params.skip)
        return gpu_duration(steps, len(params.concepts), width, height, inversion=True, **cost)
    return gpu_duration(params.steps, len(params.concepts), params.width, params.height, **cost)
