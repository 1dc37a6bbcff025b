"""SEGA: semantic guidance for Stable Diffusion, as a Gradio app (UI and event wiring; the rest is in server/ and sega/).

    python app.py [--model HUB_ID_OR_FOLDER ...] [--no-safety-checker] [--host 127.0.0.1] [--port 7860]

``--model`` repeated (or ``SEGA_MODELS``, comma-separated) serves several models: the first is the default, the
page shows a model choice, and /generate and /edit take ``model``.
"""

import spaces  # noqa: I001  first: on a ZeroGPU Space it must patch CUDA before torch initialises it

import argparse
import functools
import inspect
import logging
import os
import sys
from collections.abc import Iterator

import gradio as gr
from gradio.data_classes import FileData
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException as StarletteHTTPException

import sega
from server import form, gpu, limits, service, snippets, widgets
from server.images import mask_overlays
from server import params as api
from server.loading import LoadedModel, load_models

logger = logging.getLogger("sega.app")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SEGA semantic guidance demo")
    parser.add_argument("--model", action="append", default=None,
                        help="hub id or local folder; repeat it to serve several, the first being the default "
                             "(default: $SEGA_MODELS, comma-separated, else $SEGA_MODEL, else SD 1.5 on a GPU, "
                             "the demo model on a CPU)")
    parser.add_argument("--no-safety-checker", action="store_true", help="turn the safety checker off (local use)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    return parser.parse_args(argv)


# Command-line options only when run as a script: under pytest, sys.argv belongs to pytest.
ARGS = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
# The served models by the id requests name them with; the first is the default (each logs its own fallback).
MODELS: dict[str, LoadedModel] = load_models(ARGS.model, safety_checker=not ARGS.no_safety_checker)
LOADED = next(iter(MODELS.values()))  # the default model
PROFILE = LOADED.profile
# Each model's limits (on ZeroGPU its profile's defaults), read per request.
LIMITS: dict[str, api.Limits] = {model_id: api.limits_for(loaded) for model_id, loaded in MODELS.items()}
DEFAULTS = api.defaults(LOADED)
# Cached example results belong to one set of weights: other models (or a retrained one) get their own folder.
os.environ.setdefault("GRADIO_EXAMPLES_CACHE", os.path.join(
    ".gradio", "cached_examples", "-".join(service.model_fingerprint(loaded) for loaded in MODELS.values())))
QUEUE_SIZE, CONCURRENCY = limits.queue_settings()  # SEGA_QUEUE_SIZE, SEGA_CONCURRENCY
# What an API caller gets when the queue is full (gradio's browser client says "This application is currently
# busy. Please try again.", gradio_client "Queue is full! Please try again.").
BUSY_MESSAGE = "The server is busy (its queue of waiting requests is full). Please try again in a minute."

CSS = """
/* small images (the demo model's are 32 px) are scaled up to fill their box, without blurring */
.pixelated img { image-rendering: pixelated; }
#original img, #edited img, #edit-original img, #edit-edited img { width: 100%; height: 100%; object-fit: contain; }
#fallback-banner { border: 1px solid #f59e0b; border-radius: 8px; padding: 0 12px; background: #fffbeb; }
"""

# ----------------------------------------------------------------------------------------------
# Handlers (thin: validation and generation live in server/)
# ----------------------------------------------------------------------------------------------


def _gpu_seconds(params: api.GenerationParams, stop: gpu.StopSignal | None = None, previews: bool = False) -> int:
    return service.gpu_seconds(params, MODELS[params.model].profile)


@spaces.GPU(duration=_gpu_seconds)
def run_on_gpu(params: api.GenerationParams, stop: gpu.StopSignal | None = None,
               previews: bool = False) -> Iterator[gpu.Step | gpu.Stopped | service.GenerationResult]:
    # A generator of steps (some with a preview image), then the result (server.gpu); on ZeroGPU it runs in a
    # worker process, which sees ``stop`` (a file) before every step. Takes only picklable arguments.
    yield from gpu.denoise(MODELS[params.model], params, stop, previews)


def parse(raw: dict, endpoint: str) -> api.GenerationParams:
    try:
        return api.parse_request(MODELS, raw, LIMITS, endpoint, upload_roots=_upload_roots())
    except api.InvalidInput as exc:
        raise gr.Error(str(exc), title="Invalid input", print_exception=False) from None


def run(params: api.GenerationParams, previews: bool = False,
        wanted=gpu.event_alive) -> Iterator[gpu.Step | service.GenerationResult]:
    """The one run path of the UI, the examples and the API: the steps, then the result (server.gpu.follow
    stops the run once ``wanted()`` says no: a Stop, ``Job.cancel()``, a closed page); a stopped run raises
    ``sega.Stopped``. ``gr.Error``s pass through (ours, and ZeroGPU's: quota, no GPU free); anything else is
    a failure here, outside the GPU function."""
    try:
        yield from gpu.follow(run_on_gpu, params, previews, wanted)
    except (sega.Stopped, gr.Error):
        raise
    except Exception as exc:
        logger.error("generation failed", exc_info=exc)
        raise gr.Error(f"Generation failed ({type(exc).__name__}); please try again.",
                       print_exception=False) from None


def result_of(params: api.GenerationParams, wanted=gpu.event_alive) -> service.GenerationResult:
    """The run's result, for callers without progress (the API, an example's first run); a stop is an error
    titled "Stopped" (so that a stopped example is not cached)."""
    try:
        *_, result = run(params, wanted=wanted)
    except sega.Stopped as exc:
        raise gr.Error(str(exc), title="Stopped", print_exception=False) from None
    return result


def _upload_roots() -> tuple[str, ...]:
    """Where an uploaded image may be read from: gradio's upload cache, and the examples' own folder."""
    return (demo.GRADIO_CACHE, *{os.path.dirname(path) for loaded in MODELS.values()
                                 for _, path, *_ in loaded.profile.edit_examples})


def _saved(result: service.GenerationResult) -> tuple[str | None, str | None]:
    return service.save_png(result.original, demo.GRADIO_CACHE), service.save_png(result.edited, demo.GRADIO_CACHE)


def _outputs(params: api.GenerationParams, result: service.GenerationResult, details: bool,
             request: gr.Request | None = None) -> tuple:
    """Both images, the pair for the slider, the seed and the JSON; for /edit also the summary and both
    snippets (the Generate tab derives those from the JSON instead, so that cached examples show them too)."""
    for notice in result.used["notices"]:
        gr.Warning(notice)
    original, edited = _saved(result)
    pair = (original, edited) if original is not None and edited is not None else None
    outputs = (original, edited, pair, params.seed, result.used)
    return (*outputs, result.summary, *snippets.as_code(params, app_address(request))) if details else outputs


def app_address(request: gr.Request | None) -> str:
    """What "As code" connects to: the Space on a Space ($SPACE_ID), else the address the visitor used."""
    headers = dict(getattr(request, "headers", None) or {}) if request is not None else {}
    url = str(getattr(request, "url", "") or "") if request is not None else ""
    return snippets.app_address(os.environ.get("SPACE_ID"), headers, url)


def run_ui(raw: dict, endpoint: str, before, progress: gr.Progress,
           request: gr.Request | None = None) -> Iterator[tuple]:
    """Run for the UI, yielding the outputs (see :func:`_outputs`) and the run's state: while the run goes,
    a preview in the "With edits" box every few steps, and in the state the image that box showed before
    (``before``), which the Stop button puts back (a stopped run keeps the previous images; a Stop cancels
    this event, so nothing this handler yields after it reaches the page). A failure puts it back too."""
    n = 8 if endpoint == "edit" else 5
    skip = (gr.skip(),) * n
    restore = (gr.skip(), before, *skip[2:], None)
    params = parse(raw, endpoint)
    yield (*skip, {"before": before})
    try:
        for item in run(params, previews=True):
            if not isinstance(item, gpu.Step):
                yield (*_outputs(params, item, n == 8, request), None)
                return
            progress((item.done, item.total), unit="steps",
                     desc="Inverting your image" if item.stage == "inversion" else "Denoising")
            if item.preview is not None:
                yield (gr.skip(), service.save_png(item.preview, demo.GRADIO_CACHE), *skip[2:], gr.skip())
    except sega.Stopped as exc:
        gr.Info(str(exc))
        yield restore
    except Exception:
        yield restore
        raise


def stopped(state: dict | None) -> tuple:
    """The Stop buttons' own handler (their ``cancels=`` stop the run): the notice, and the image that a
    preview replaced back in the "With edits" box."""
    gr.Info("Stopped.", title="Stopped")
    return (gr.skip() if state is None else state["before"]), None


def show_details(used, request: gr.Request) -> tuple[str, str, str]:
    """Summary and "as code" from the parameters used (also when they come from a cached example)."""
    if hasattr(used, "model_dump"):  # cached examples hand gr.JSON values over as a pydantic model
        used = used.model_dump()
    if not used:
        return "", "", ""
    client_code, library_code = snippets.as_code(api.params_from_json(MODELS, used, LIMITS), app_address(request))
    return used.get("summary", ""), client_code, library_code


def show_masks(used, edited: str | None):
    """Per concept, its mask (from the JSON's "masks") over the image with edits; hidden without masks."""
    if hasattr(used, "model_dump"):
        used = used.model_dump()
    items = mask_overlays(edited, (used or {}).get("masks") or [])
    return gr.Gallery(value=items or None, visible=bool(items))


def keep_seed(seed_used):
    """The seed a run used, for the Seed box (nothing when there is none)."""
    return gr.skip() if seed_used is None else seed_used


def send_to_edit(image: str | None, used) -> tuple:
    """"Edit this image": the generated image with edits into the Edit tab, its prompt as the source prompt."""
    if hasattr(used, "model_dump"):
        used = used.model_dump()
    if not image:
        raise gr.Error("Generate an image first: there is no image with edits to send.", title="Nothing to edit",
                       print_exception=False)
    return image, (used or {}).get("prompt", ""), gr.Tabs(selected="edit-tab")


# ----------------------------------------------------------------------------------------------
# UI
# ----------------------------------------------------------------------------------------------


# The API's input types by declared kind (gr.api documents and names the parameters from the handler's signature).
API_TYPES = {"text": str, "json": list[dict], "int": int, "float": float, "file": FileData}
# Per endpoint: what it does, and what its first image is.
API_DESCRIPTIONS = {"generate": ("Generate the image without edits and the image with edits for one seed.",
                                 "the image without edits"),
                    "edit": ("Edit an uploaded image: invert it, then apply the concepts.",
                             "the reconstruction without edits")}


def api_default(endpoint: str, name: str):
    """What an API input shows as its default: the value every served model defaults to, else None (then the
    server fills in the chosen model's own default: a client must not send one model's default to another)."""
    # /edit's defaults are those of the models that edit uploads (a FLUX model refuses /edit).
    models = [loaded for loaded in MODELS.values() if endpoint != "edit" or loaded.profile.edits_uploads]
    values = {repr(api.defaults(loaded, endpoint)[name]) for loaded in models}
    return api.defaults(models[0], endpoint)[name] if len(values) == 1 else None


def api_handler(endpoint: str):
    """The public endpoint's function for ``gr.api``: its signature (names, types, defaults) and docstring are
    made from the declarations; it runs the request as the UI does and returns both images and the JSON."""
    declared = api.ENDPOINTS[endpoint]

    def handler(*values):
        result = result_of(parse(dict(zip((p.name for p in declared), values)), endpoint))
        return *(None if path is None else FileData(path=path) for path in _saved(result)), result.used

    parameters = []
    for p in declared:
        required = p.default is None and p.default_from is None
        # A parameter whose default follows another one shows no default of its own.
        default = inspect.Parameter.empty if required else None if p.default_from else api_default(endpoint, p.name)
        kind = API_TYPES[p.kind]
        parameters.append(inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                            annotation=kind if required else kind | None))
    returns = tuple[FileData | None, FileData | None, dict]
    handler.__signature__ = inspect.Signature(parameters, return_annotation=returns)
    handler.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": returns}
    handler.__name__ = endpoint
    what, first = API_DESCRIPTIONS[endpoint]
    handler.__doc__ = "\n".join([what, "", "Args:", *(f"    {p.name}: {p.doc}" for p in declared), "Returns:",
                                 f"    {first}, the image with edits, and the parameters actually used"])
    return handler


def example_index(evt: gr.SelectData) -> int:
    return evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index


class ModelPanel:
    """One served model's page: its intro and both tabs (Generate, Edit an image), every widget from the
    model's declarations, presets and limits, and their events. ``prefix`` keeps the element ids of several
    models' panels apart (the default model's has none)."""

    def __init__(self, loaded: LoadedModel, prefix: str = ""):
        self.loaded, self.profile = loaded, loaded.profile
        self.model_id = loaded.model_id
        self.limits = limits = LIMITS[loaded.model_id]
        self.defaults = api.defaults(loaded)
        # Every numeric widget's range, step and starting value, from the API's declarations (server/form.py).
        self.form = form.settings(loaded, limits)
        self.edits_uploads = loaded.profile.edits_uploads  # FLUX: the Edit tab only says what it needs
        if self.edits_uploads:
            self.edit_defaults = api.defaults(loaded, "edit")
            self.edit_form = form.settings(loaded, limits, "edit")
        with gr.Column(visible=loaded is LOADED, elem_id=f"{prefix}panel") as self.column:
            self.build(prefix)
        self.wire()

    def build(self, p: str) -> None:
        gr.Markdown(self.loaded.intro)
        if self.loaded.fallback_reason:
            gr.Markdown(f"**Note:** {self.loaded.fallback_reason}", elem_id=f"{p}fallback-banner")
        with gr.Tabs() as self.tabs:
            with gr.Tab("Generate", id="generate-tab"):
                self.build_generate_tab(p)
            with gr.Tab("Edit an image", id="edit-tab"):
                if self.edits_uploads:
                    self.build_edit_tab(p)
                else:
                    gr.Markdown(f"Editing an uploaded image needs a Stable Diffusion or SDXL model; "
                                f"**{self.loaded.label}** is a FLUX model, which generates only.",
                                elem_id=f"{p}edit-unsupported")

    def build_generate_tab(self, p: str) -> None:
        with gr.Row():
            with gr.Column(scale=5):
                self.prompt = gr.Textbox(label="Prompt", lines=2, elem_id=f"{p}prompt",
                                         placeholder=self.profile.prompt_placeholder)
                # Only what the model uses (its profile's unused_params: FLUX has no negative prompt, scheduler
                # choice or masks, FLUX.1-schnell no guidance scale).
                uses = self.uses
                negative_prompt = gr.Textbox(label="Negative prompt", value="", elem_id=f"{p}negative-prompt") \
                    if uses("negative_prompt") else None
                self.concept_rows = widgets.ConceptRows(self.loaded, self.limits, f"{p}concept")
                mask = widgets.mask_choice(self.loaded, "generate", f"{p}mask") if uses("mask") else None
                self.seed, self.randomize = widgets.seed_row(p, self.form)
                with gr.Row():
                    steps = widgets.slider(self.form["steps"], elem_id=f"{p}steps")
                    guidance = widgets.slider(self.form["guidance_scale"], elem_id=f"{p}guidance") \
                        if uses("guidance_scale") else None
                with gr.Row():
                    width = widgets.slider(self.form["width"], elem_id=f"{p}width")
                    height = widgets.slider(self.form["height"], elem_id=f"{p}height")
                    scheduler = gr.Dropdown(list(api.SCHEDULERS), value=self.defaults["scheduler"],
                                            label="Scheduler", elem_id=f"{p}scheduler") if uses("scheduler") else None
                with gr.Accordion("Advanced", open=False):
                    momentum_scale, momentum_beta = widgets.momentum_sliders(self.form, p)
                    self.show_advanced = gr.Checkbox(False, label="Show cooldown and weight for each concept")
                with gr.Row():
                    self.generate_btn = gr.Button("Generate", variant="primary", elem_id=f"{p}generate")
                    self.stop_btn = gr.Button("Stop", variant="stop", elem_id=f"{p}stop")
            with gr.Column(scale=4):
                self.generated = widgets.result_column("Without edits", p)
                self.edit_this_btn = gr.Button("Edit this image", size="sm", elem_id=f"{p}edit-this",
                                               visible=self.edits_uploads)
        # Examples fill the form (rows included) and show a lazily cached result.
        example_concepts = gr.JSON(visible=False)
        self.generate_examples = gr.Examples(
            examples=[[prompt, seed, concepts] for _, prompt, concepts, seed in self.profile.examples],
            example_labels=[label for label, *_ in self.profile.examples],
            inputs=[self.prompt, self.seed, example_concepts],
            outputs=self.generated["images"],
            fn=self.run_example,
            cache_examples=True,
            cache_mode="lazy",
            api_visibility="private",
        )
        # The settings widgets, by API parameter name: requests are read from (and examples reset) these.
        settings = {"negative_prompt": negative_prompt, "steps": steps, "guidance_scale": guidance,
                    "width": width, "height": height, "scheduler": scheduler, "momentum_scale": momentum_scale,
                    "momentum_beta": momentum_beta, "mask": mask}
        self.settings = {name: widget for name, widget in settings.items() if widget is not None}

    def uses(self, name: str) -> bool:
        """Whether the served model uses the API parameter ``name`` (the form shows only those)."""
        return name not in self.profile.unused_params

    def build_edit_tab(self, p: str) -> None:
        with gr.Row():
            with gr.Column(scale=5):
                self.upload = widgets.hand_over_untouched(gr.Image(
                    label="Your image (PNG, JPEG or WebP)", type="filepath", image_mode=None,
                    sources=["upload", "clipboard"], height=260, elem_id=f"{p}edit-image",
                    elem_classes="pixelated"))
                self.source_prompt = gr.Textbox(label="Source prompt", elem_id=f"{p}edit-source-prompt",
                                                placeholder="describe your image; empty works too")
                self.edit_rows = widgets.ConceptRows(self.loaded, self.limits, f"{p}edit-concept", "edit")
                edit_mask = widgets.mask_choice(self.loaded, "edit", f"{p}edit-mask")
                self.edit_seed, self.edit_randomize = widgets.seed_row(f"{p}edit-", self.edit_form)
                with gr.Row():
                    edit_steps = widgets.slider(self.edit_form["steps"], elem_id=f"{p}edit-steps")
                    skip = widgets.slider(self.edit_form["skip"], elem_id=f"{p}edit-skip")
                source_guidance = widgets.slider(self.edit_form["source_guidance_scale"],
                                                 elem_id=f"{p}edit-guidance")
                with gr.Accordion("Advanced", open=False):
                    self.edit_guidance = widgets.number_box(self.edit_form["guidance_scale"],
                                                            elem_id=f"{p}edit-edit-guidance")
                    edit_momentum_scale, edit_momentum_beta = widgets.momentum_sliders(self.edit_form, f"{p}edit-")
                    self.edit_show_advanced = gr.Checkbox(False, label="Show cooldown and weight for each concept")
                with gr.Row():
                    self.edit_btn = gr.Button("Edit", variant="primary", elem_id=f"{p}edit")
                    self.edit_stop_btn = gr.Button("Stop", variant="stop", elem_id=f"{p}edit-stop")
            with gr.Column(scale=4):
                self.edited = widgets.result_column("Reconstruction (without edits)", f"{p}edit-")
        self.edit_examples = None
        if self.profile.edit_examples:
            # They fill the form only; pressing Edit runs them.
            self.edit_examples = gr.Examples(
                examples=[[path, source, seed] for _, path, source, _, seed in self.profile.edit_examples],
                example_labels=[label for label, *_ in self.profile.edit_examples],
                inputs=[self.upload, self.source_prompt, self.edit_seed],
                label="Images to edit (drawn by the demo model's renderer, not by the model)",
            )
        self.edit_settings = {"source_prompt": self.source_prompt, "steps": edit_steps, "skip": skip,
                              "guidance_scale": self.edit_guidance, "source_guidance_scale": source_guidance,
                              "momentum_scale": edit_momentum_scale, "momentum_beta": edit_momentum_beta,
                              "mask": edit_mask}

    def wire(self) -> None:
        generated, concept_rows, settings = self.generated, self.concept_rows, self.settings
        concept_rows.wire_advanced(self.show_advanced)
        concept_rows.wire_presets(settings.get("mask"))
        # A click on an example fills the rows from the example itself (a change of a hidden value would not fire
        # when the same example is clicked twice).
        self.generate_examples.dataset.select(self.fill_generate_form, None,
                                              [*concept_rows.outputs, self.randomize, *settings.values()],
                                              api_visibility="private", queue=False)
        # Summary and code are derived from the JSON: cached examples store JSON faithfully, free text less so.
        generated["used"].change(show_details, generated["used"], generated["details"], api_visibility="private")
        self.wire_result(generated, self.seed)

        # Generate -------------------------------------------------------------------------------
        # The tab's run state: while its run goes, the image its "With edits" box showed before the previews.
        generate_run = gr.State(None)
        model_id = self.model_id

        def generate_ui(v: dict, request: gr.Request, progress=gr.Progress()):
            raw = {"prompt": v[self.prompt], "concepts": concept_rows.read(v), "model": model_id,
                   "seed": None if v[self.randomize] else v[self.seed],
                   **{name: v[widget] for name, widget in settings.items()}}
            yield from run_ui(raw, "generate", v[generated["images"][1]], progress, request)

        gen_event = gr.on([self.generate_btn.click, self.prompt.submit], generate_ui,
                          {self.prompt, self.randomize, self.seed, generated["images"][1], *settings.values(),
                           *concept_rows.inputs},
                          [*generated["images"], generate_run], api_visibility="private", concurrency_id="gpu",
                          concurrency_limit="default")
        # Stop cancels this tab's run (and an example's first run), nothing else: server.gpu.follow notices.
        self.stop_btn.click(stopped, generate_run, [generated["images"][1], generate_run],
                            cancels=[gen_event, self.generate_examples.cache_event], show_progress="hidden",
                            api_visibility="private")
        if self.edits_uploads:
            self.wire_edit()

    @staticmethod
    def wire_result(result: dict, seed_box: gr.Number) -> None:
        """A result column's masks (cached examples included, over the image with edits) and its seed, which
        goes back into the Seed box (Random seed stays as it was): one click reproduces a result."""
        result["used"].change(show_masks, [result["used"], result["edited"]], result["masks"],
                              api_visibility="private")
        result["seed_used"].change(keep_seed, result["seed_used"], seed_box, api_visibility="private", queue=False)

    def wire_edit(self) -> None:
        edited, edit_rows, edit_settings = self.edited, self.edit_rows, self.edit_settings
        edit_rows.wire_advanced(self.edit_show_advanced)
        edit_rows.wire_presets(edit_settings["mask"])
        if self.edit_examples is not None:
            self.edit_examples.dataset.select(self.fill_edit_form, None,
                                              [*edit_rows.outputs, self.edit_randomize, *edit_settings.values()],
                                              api_visibility="private", queue=False)
        self.wire_result(edited, self.edit_seed)
        self.edit_this_btn.click(send_to_edit, [self.generated["edited"], self.generated["used"]],
                                 [self.upload, self.source_prompt, self.tabs], api_visibility="private", queue=False)
        edit_run = gr.State(None)
        model_id = self.model_id

        def edit_ui(v: dict, request: gr.Request, progress=gr.Progress()):
            raw = {"image": v[self.upload], "concepts": edit_rows.read(v), "model": model_id,
                   "seed": None if v[self.edit_randomize] else v[self.edit_seed],
                   **{name: v[widget] for name, widget in edit_settings.items()}}
            yield from run_ui(raw, "edit", v[edited["images"][1]], progress, request)

        edit_event = self.edit_btn.click(edit_ui, {self.upload, self.edit_randomize, self.edit_seed,
                                                   edited["images"][1], *edit_settings.values(), *edit_rows.inputs},
                                         [*edited["images"], *edited["details"], edit_run],
                                         api_visibility="private", concurrency_id="gpu", concurrency_limit="default")
        self.edit_stop_btn.click(stopped, edit_run, [edited["images"][1], edit_run], cancels=[edit_event],
                                 show_progress="hidden", api_visibility="private")

    def run_example(self, prompt_text, example_seed, concepts, request: gr.Request):
        # Example caching hands gr.JSON values over as a pydantic model, not as plain lists.
        if hasattr(concepts, "model_dump"):
            concepts = concepts.model_dump()
        # gr.Examples computes an example's first result outside the queue, inside the example's own queued
        # event (which the Stop button cancels): the run follows that event.
        wanted = functools.partial(gpu.event_alive, session_hash=getattr(request, "session_hash", None),
                                   fn_ids=frozenset({self.generate_examples.cache_event["id"]}))
        params = parse({"prompt": prompt_text, "seed": example_seed, "concepts": concepts, "model": self.model_id},
                       "generate")
        return _outputs(params, result_of(params, wanted), details=False)

    def fill_generate_form(self, evt: gr.SelectData) -> dict:
        """The clicked example's concepts in the rows, every other setting back to its default (each click:
        also when the same example is clicked again after a row was changed)."""
        _, _, concepts, _ = self.profile.examples[example_index(evt)]
        return {**self.concept_rows.fill(concepts), self.randomize: False,
                **{widget: self.defaults[name] for name, widget in self.settings.items()}}

    def fill_edit_form(self, evt: gr.SelectData) -> dict:
        """The clicked edit example's concepts in the rows, every other setting back to its default."""
        _, _, _, concepts, _ = self.profile.edit_examples[example_index(evt)]
        return {**self.edit_rows.fill(concepts), self.edit_randomize: False, self.edit_guidance: None,
                **{widget: self.edit_defaults[name] for name, widget in self.edit_settings.items()
                   if name not in ("source_prompt", "guidance_scale")}}


def show_panel(model_id: str) -> list:
    """The chosen model's panel shown, the others hidden."""
    return [gr.Column(visible=panel.model_id == model_id) for panel in PANELS]


with gr.Blocks(title="SEGA: semantic guidance", delete_cache=(900, 3600)) as demo:
    gr.Markdown("# SEGA: semantic guidance for diffusion")
    # With several models, a choice (the "model" parameter's values); each model has its own panel, built from
    # its own declarations, so that its limits, presets and examples follow the choice.
    model_choice = gr.Radio([(loaded.label, model_id) for model_id, loaded in MODELS.items()], value=LOADED.model_id,
                            label="Model", visible=len(MODELS) > 1, elem_id="model")
    PANELS = [ModelPanel(loaded, "" if i == 0 else f"m{i}-") for i, loaded in enumerate(MODELS.values())]
    model_choice.change(show_panel, model_choice, [panel.column for panel in PANELS], api_visibility="private",
                        queue=False)

    # Public API: named parameters built from their declarations (validated in server/); concurrency_limit
    # "default": the queue's default_concurrency_limit, set in launch().
    for endpoint in api.ENDPOINTS:
        gr.api(api_handler(endpoint), api_name=endpoint, concurrency_id="gpu", concurrency_limit="default")


async def _http_error(request, exc: StarletteHTTPException):
    """FastAPI's HTTP error answer, with gradio's "Queue is full. Max size is ..." said for people."""
    if exc.status_code == 503 and str(exc.detail).startswith("Queue is full"):
        exc = StarletteHTTPException(503, BUSY_MESSAGE, headers={"Retry-After": "30"})
    return await http_exception_handler(request, exc)


def launch(queue_size: int | None = None, concurrency: int | None = None, **kwargs) -> tuple:
    """Start the server (``python app.py``; tests call this with ``prevent_thread_lock=True``).

    ``queue_size`` and ``concurrency`` override SEGA_QUEUE_SIZE and SEGA_CONCURRENCY. A bounded queue answers
    "busy, try again" (HTTP 503) at once instead of piling up work.
    """
    demo.queue(max_size=QUEUE_SIZE if queue_size is None else queue_size,
               default_concurrency_limit=CONCURRENCY if concurrency is None else concurrency)
    # An upload above SEGA_MAX_IMAGE_MB is refused by gradio as it arrives (server/images.py checks it again).
    largest = max(limits.max_image_mb for limits in LIMITS.values())
    kwargs.setdefault("max_file_size", largest * 1024 * 1024)  # bytes, as server/images.py counts
    return demo.launch(css=CSS, app_kwargs={"exception_handlers": {StarletteHTTPException: _http_error}}, **kwargs)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for loaded in MODELS.values():
        logger.info("model %s on %s (profile: %s)", loaded.model_id, loaded.device, loaded.profile.name)
    launch(server_name=ARGS.host, server_port=ARGS.port)
