"""Which model the app serves, and how it is loaded (with a fallback to the bundled demo model)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sega.demo.shapes import DEFAULT_MODEL_DIR
from sega.pipeline import SegaPipeline
from sega.pipeline_flux import SegaFluxPipeline
from sega.pipeline_xl import SegaXLPipeline

from .profiles import ModelProfile, min_size, native_size, profile_for, size_multiple

logger = logging.getLogger(__name__)

SD_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass(frozen=True)
class ModelFacts:
    """What the API's bounds and defaults depend on besides the limits, without the weights (a form for a model
    that is not loaded, e.g. Stable Diffusion in a test, is built from these)."""

    profile: ModelProfile
    native_size: int
    min_size: int = 8
    train_timesteps: int = 1000  # the scheduler's training timesteps: the most steps it can sample
    model_id: str = ""  # the "model" parameter's default
    size_multiple: int = 8  # what a width or height must be a multiple of


@dataclass
class LoadedModel:
    """A pipeline ready to serve, and what the app needs to know about it."""

    pipe: SegaPipeline
    model_id: str
    profile: ModelProfile
    fallback_reason: str | None
    device: str

    @property
    def is_demo(self) -> bool:
        return self.profile.name == "demo"

    @property
    def label(self) -> str:
        """A short name for the model choice: the hub id, or a folder's name ("demo" for the bundled model)."""
        if self.is_demo and Path(self.model_id).resolve() == DEFAULT_MODEL_DIR.resolve():
            return "demo (bundled)"
        return Path(self.model_id).name if Path(self.model_id).is_dir() else self.model_id

    @property
    def native_size(self) -> int:
        return native_size(self.pipe)

    @property
    def min_size(self) -> int:
        return min_size(self.pipe)

    @property
    def size_multiple(self) -> int:
        return size_multiple(self.pipe)

    @property
    def train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts(self.profile, self.native_size, self.min_size, self.train_timesteps, self.model_id,
                          self.size_multiple)

    @property
    def intro(self) -> str:
        return self.profile.intro.replace("{size}", str(self.native_size))


def on_zero_gpu(env: Mapping[str, str] | None = None) -> bool:
    """True on a Hugging Face ZeroGPU Space (``SPACES_ZERO_GPU``, read as the ``spaces`` package reads it; the
    GPU is attached per call, so CUDA may look absent here)."""
    env = os.environ if env is None else env
    return env.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def gpu_present(env: Mapping[str, str] | None = None) -> bool:
    return on_zero_gpu(env) or torch.cuda.is_available()


def default_model(env: Mapping[str, str] | None = None) -> str:
    """SD 1.5 when a GPU can run it, the small bundled model otherwise (fast on a CPU, no hub needed)."""
    return SD_MODEL_ID if gpu_present(env) else str(DEFAULT_MODEL_DIR)


def pipeline_class_for(config: Mapping) -> type[SegaPipeline]:
    """The pipeline for a checkpoint's ``model_index.json``: :class:`SegaFluxPipeline` for FLUX.1 (a
    FluxPipeline, or a FluxTransformer2DModel as its transformer), :class:`SegaXLPipeline` for SDXL (a second
    text encoder), :class:`SegaPipeline` for Stable Diffusion 1.x/2.x."""
    transformer = config.get("transformer") or (None, None)
    if config.get("_class_name") == "FluxPipeline" or transformer[-1] == "FluxTransformer2DModel":
        return SegaFluxPipeline
    return SegaXLPipeline if "text_encoder_2" in config else SegaPipeline


def pipeline_class(model: str) -> type[SegaPipeline]:
    """:func:`pipeline_class_for` the config of ``model`` (a hub id or a local folder)."""
    from diffusers import DiffusionPipeline

    return pipeline_class_for(DiffusionPipeline.load_config(model))


def pipeline_class_name(model: str) -> str:
    """The name of :func:`pipeline_class` for ``model`` ("SegaPipeline" when its config cannot be read)."""
    try:
        return pipeline_class(model).__name__
    except Exception:  # e.g. a hub id that is not cached on an offline machine
        return SegaPipeline.__name__


class NeedsGPU(RuntimeError):
    """A model too large to serve without a GPU (its fallback reason says so)."""


def failure_reason(exc: Exception) -> str:
    """Why a model could not be loaded, in a few words: our own refusal's message, else the error's kind (a
    gated repository, such as FLUX.1-dev's, needs an access token)."""
    if isinstance(exc, NeedsGPU):
        return str(exc)
    if type(exc).__name__ == "GatedRepoError":
        return "GatedRepoError: a gated model; accept its licence on the hub and set HF_TOKEN"
    return type(exc).__name__


# On a GPU: FLUX.1 in bfloat16 (its weights' own type; float16 overflows in its activations), the others float16.
GPU_DTYPES: dict[type, torch.dtype] = {SegaFluxPipeline: torch.bfloat16}
DEFAULT_GPU_DTYPE = torch.float16


def _load(model: str, device: str, safety_checker: bool) -> SegaPipeline:
    cls = pipeline_class(model)
    on_gpu = device.startswith("cuda")
    if cls is SegaFluxPipeline and not on_gpu and not Path(model).is_dir():
        # FLUX.1's 12B transformer and T5-XXL: tens of GB to download and minutes per step on a CPU. A local
        # folder (small test components) still loads.
        raise NeedsGPU(f"{model} is a FLUX.1 model, which needs a GPU")
    dtype = GPU_DTYPES.get(cls, DEFAULT_GPU_DTYPE) if on_gpu else torch.float32
    kwargs: dict = {"dtype": dtype}
    if cls is SegaPipeline and not safety_checker:  # SDXL checkpoints have no safety checker
        kwargs["safety_checker"] = None
    # from_pretrained takes a hub id or a local folder; never trust_remote_code.
    pipe = cls.from_pretrained(model, **kwargs)
    return pipe.to(device)


def load_pipeline(model: str | None = None, device: str | None = None, safety_checker: bool = True) -> LoadedModel:
    """Load ``model`` (a hub id or local folder; default: ``$SEGA_MODEL``, else :func:`default_model`).

    fp16 on CUDA (FLUX: bf16, :data:`GPU_DTYPES`), fp32 on the CPU. When the model cannot be loaded (no hub
    access, a missing folder, FLUX from the hub without a GPU...),
    log a warning and serve the bundled demo model instead, with the reason in ``fallback_reason``.
    """
    requested = model or os.environ.get("SEGA_MODEL") or default_model()
    if device is None:
        device = "cuda" if gpu_present() else "cpu"
    bundled = str(DEFAULT_MODEL_DIR)
    try:
        pipe = _load(requested, device, safety_checker)
        model_id, reason = requested, None
    except Exception as exc:  # any failure to load: fall back rather than not start at all
        if Path(requested).resolve() == DEFAULT_MODEL_DIR.resolve():
            raise
        reason = (f"Could not load the model {requested!r} ({failure_reason(exc)}); serving the bundled demo model "
                  "instead.")
        logger.warning("%s Details: %s", reason, str(exc).splitlines()[0][:300] if str(exc) else "")
        pipe = _load(bundled, device, safety_checker)
        model_id = bundled
    pipe.set_progress_bar_config(desc="Denoising", leave=False)
    return LoadedModel(pipe=pipe, model_id=model_id, profile=profile_for(pipe), fallback_reason=reason,
                       device=device)


def requested_models(models: list[str] | None = None, env: Mapping[str, str] | None = None) -> list[str]:
    """The models to serve, in order (the first is the default): ``models`` (``--model``, repeatable), else
    ``$SEGA_MODELS`` (comma-separated), else ``$SEGA_MODEL``, else :func:`default_model`."""
    env = os.environ if env is None else env
    if models:
        return list(models)
    listed = [m.strip() for m in env.get("SEGA_MODELS", "").split(",") if m.strip()]
    return listed or [env.get("SEGA_MODEL") or default_model(env)]


def load_models(models: list[str] | None = None, device: str | None = None,
                safety_checker: bool = True) -> dict[str, LoadedModel]:
    """Load every model of :func:`requested_models`, by the id requests name them with (``LoadedModel.model_id``).

    Each falls back to the bundled demo model on its own (:func:`load_pipeline`); the demo model is served once
    however many fell back to it, with every reason.
    """
    served: dict[str, LoadedModel] = {}
    for model in dict.fromkeys(requested_models(models)):
        loaded = load_pipeline(model, device, safety_checker)
        kept = served.setdefault(loaded.model_id, loaded)
        if kept is not loaded and loaded.fallback_reason:
            kept.fallback_reason = " ".join(filter(None, [kept.fallback_reason, loaded.fallback_reason]))
    return served
