"""SEGA: semantic guidance for Stable Diffusion, as a Gradio app (UI and event wiring; the rest is in sega/).

    python app.py [--model HUB_ID_OR_FOLDER] [--no-safety-checker] [--host 127.0.0.1] [--port 7860]
"""

import spaces  # noqa: I001  first: on a ZeroGPU Space it must patch CUDA before torch initialises it

import argparse
import logging
import os
import sys
import threading
from collections.abc import Iterator

import gradio as gr
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException as StarletteHTTPException

from sega.demo.presets import DEMO_EXAMPLES
from sega.demo.shapes import BACKGROUNDS, COLORS, SHAPES, SIZES
from server import gpu, service
from server.loading import load_pipeline
from server.profiles import defaults_for, presets_for

logger = logging.getLogger("sega.app")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SEGA semantic guidance demo")
    parser.add_argument("--model", default=None,
                        help="hub id or local folder (default: $SEGA_MODEL, else SD 1.5 on a GPU, the demo model on CPU)")
    parser.add_argument("--no-safety-checker", action="store_true", help="turn the safety checker off (local use)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    return parser.parse_args(argv)


# Command-line options only when run as a script: under pytest, sys.argv belongs to pytest.
ARGS = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
LIMITS = service.Limits.from_env()
LOADED = load_pipeline(ARGS.model, safety_checker=not ARGS.no_safety_checker)  # logs a fallback itself
DEFAULTS = service.ui_defaults(LOADED)
PRESETS = presets_for(LOADED.is_demo)
DEFAULT_PRESET = defaults_for(LOADED.is_demo)["default_preset"]
NATIVE = service.native_size(LOADED)
MAX_ROWS = LIMITS.max_concepts
# Cached example results belong to one set of weights: another model (or a retrained one) gets its own folder.
os.environ.setdefault("GRADIO_EXAMPLES_CACHE", os.path.join(".gradio", "cached_examples",
                                                            service.model_fingerprint(LOADED)))
QUEUE_SIZE, CONCURRENCY = service.queue_settings()  # SEGA_QUEUE_SIZE, SEGA_CONCURRENCY
# What an API caller gets when the queue is full (gradio's browser client says "This application is currently
# busy. Please try again.", gradio_client "Queue is full! Please try again.").
BUSY_MESSAGE = "The server is busy (its queue of waiting requests is full). Please try again in a minute."

# One stop flag per browser session: the step callback of that session's run checks it.
_stop_flags: dict[str, gpu.StopSignal] = {}
_stop_lock = threading.Lock()

CSS = """
/* small images (the demo model's are 32 px) are scaled up to fill their box, without blurring */
#original img, #edited img, #slider img { image-rendering: pixelated; }
#original img, #edited img { width: 100%; height: 100%; object-fit: contain; }
#fallback-banner { border: 1px solid #f59e0b; border-radius: 8px; padding: 0 12px; background: #fffbeb; }
"""

if LOADED.is_demo:
    EXAMPLES = DEMO_EXAMPLES
    INTRO = (f"The bundled **demo model** draws {NATIVE}×{NATIVE} px shapes; it knows only these words: "
             f"{', '.join(SIZES)}; {', '.join(COLORS)}; {', '.join(SHAPES)}; "
             f"on a {' / '.join(BACKGROUNDS)} background. Try a concept such as `blue` or `black background`.")
else:
    EXAMPLES = [
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
    ]
    INTRO = ("Describe an image, then add **concepts** to steer it towards (add) or away from (remove) "
             "an idea while the rest of the picture stays put.")


# ----------------------------------------------------------------------------------------------
# Handlers (thin: validation and generation live in server.service)
# ----------------------------------------------------------------------------------------------


def _gpu_seconds(params: service.GenerationParams, stop: gpu.StopSignal | None = None) -> int:
    return service.gpu_duration(params.steps, len(params.concepts), params.width, params.height)


@spaces.GPU(duration=_gpu_seconds)
def run_on_gpu(params: service.GenerationParams,
               stop: gpu.StopSignal | None = None) -> Iterator[gpu.Step | gpu.Stopped | service.GenerationResult]:
    # A generator of steps, then the result (server.gpu); on ZeroGPU it runs in a worker process, which sees
    # ``stop`` (a file) at the end of every step.
    yield from gpu.denoise(LOADED, params, stop)


def _run(raw: dict, request: gr.Request | None,
         progress: gr.Progress | None = None) -> tuple[service.GenerationParams, service.GenerationResult]:
    """Validate and run; stop when Stop is pressed, the call is cancelled or the page is closed.

    ``gr.Error``s pass through unchanged: ours (from server.gpu, with our message) and ZeroGPU's (quota, no GPU
    free), so the visitor learns why. Anything else is a failure here, outside the GPU function.
    """
    try:
        params = service.parse_request(LOADED, raw, LIMITS)
    except service.InvalidInput as exc:
        raise gr.Error(str(exc), title="Invalid input", print_exception=False) from None
    key = getattr(request, "session_hash", None)
    flag = gpu.StopSignal()
    if key:
        with _stop_lock:
            _stop_flags[key] = flag

    def on_step(step: gpu.Step) -> None:
        if progress is not None:
            progress((step.done, step.total), desc="Denoising", unit="steps")

    try:
        return params, gpu.drive(run_on_gpu(params, flag), flag, gpu.event_alive, on_step)
    except (service.GenerationStopped, gr.Error):
        raise  # messages already; for a stop the caller decides how it looks (a UI notice, an API error)
    except Exception as exc:
        logger.exception("generation failed")
        raise gr.Error(f"Generation failed ({type(exc).__name__}); please try again.", print_exception=False) from None
    finally:
        flag.discard()
        if key:
            with _stop_lock:
                if _stop_flags.get(key) is flag:
                    del _stop_flags[key]


def stop(request: gr.Request) -> None:
    # The Stop button also cancels the event, which server.gpu.drive notices too; this is the direct way.
    with _stop_lock:
        flag = _stop_flags.get(request.session_hash)
    if flag is not None:
        flag.set()


def generate_api(prompt, concepts=None, seed=None, steps=None, guidance_scale=None, negative_prompt=None,
                 width=None, height=None, momentum_scale=None, momentum_beta=None, request: gr.Request = None):
    """Generate the image without edits and the image with edits for one seed.

    Returns the image without edits, the image with edits, and the parameters actually used (seed included).
    """
    raw = {"prompt": prompt, "concepts": concepts, "seed": seed, "steps": steps, "guidance_scale": guidance_scale,
           "negative_prompt": negative_prompt, "width": width, "height": height,
           "momentum_scale": momentum_scale, "momentum_beta": momentum_beta}
    try:
        _, result = _run(raw, request)
    except service.GenerationStopped as exc:
        raise gr.Error(str(exc), title="Stopped", print_exception=False) from None
    return *_saved(result), result.used


def _saved(result: service.GenerationResult) -> tuple[str | None, str | None]:
    return service.save_png(result.original, demo.GRADIO_CACHE), service.save_png(result.edited, demo.GRADIO_CACHE)


def _run_ui(raw: dict, request: gr.Request | None) -> tuple:
    """Run for the UI: a stopped run keeps the previous images on screen."""
    try:
        params, result = _run(raw, request, gr.Progress())
    except service.GenerationStopped as exc:
        gr.Info(str(exc))
        return (gr.skip(),) * 5
    return _ui_outputs(params, result)


def _ui_outputs(params: service.GenerationParams, result: service.GenerationResult) -> tuple:
    for notice in result.used["notices"]:
        gr.Warning(notice)
    original, edited = _saved(result)
    pair = (original, edited) if original is not None and edited is not None else None
    return original, edited, pair, params.seed, result.used


def show_details(used) -> tuple[str, str, str]:
    """Summary and "as code" from the parameters used (also when they come from a cached example)."""
    if hasattr(used, "model_dump"):  # cached examples hand gr.JSON values over as a pydantic model
        used = used.model_dump()
    if not used:
        return "", "", ""
    client_code, library_code = service.as_code(service.params_from_json(LOADED, used, LIMITS))
    return used.get("summary", ""), client_code, library_code


# ----------------------------------------------------------------------------------------------
# UI
# ----------------------------------------------------------------------------------------------


def _slider_max(value: float, floor: float) -> float:
    return max(floor, value)


with gr.Blocks(title="SEGA: semantic guidance", delete_cache=(900, 3600)) as demo:
    gr.Markdown("# SEGA: semantic guidance for diffusion\n" + INTRO)
    if LOADED.fallback_reason:
        gr.Markdown(f"**Note:** {LOADED.fallback_reason}", elem_id="fallback-banner")

    with gr.Row():
        with gr.Column(scale=5):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                placeholder="a large red circle on a white background" if LOADED.is_demo
                                else "a photo of the face of a woman")
            negative_prompt = gr.Textbox(label="Negative prompt", value="", elem_id="negative-prompt")

            n_rows = gr.State(1)
            rows = []  # per row: (group, advanced row, text, direction, preset, scale, threshold, warmup, cooldown, weight)
            for i in range(MAX_ROWS):
                d = service.concept_defaults(LOADED)
                with gr.Group(visible=i == 0, elem_id=f"concept-{i}") as group:
                    with gr.Row():
                        text = gr.Textbox(label=f"Concept {i + 1}", scale=3, elem_id=f"concept-{i}-text",
                                          placeholder="e.g. blue (leave empty to skip)" if LOADED.is_demo
                                          else "e.g. glasses, wearing glasses (leave empty to skip)")
                        direction = gr.Radio(["add", "remove"], value="add", label="Direction", scale=2,
                                             elem_id=f"concept-{i}-direction")
                        preset = gr.Dropdown(list(PRESETS), value=DEFAULT_PRESET, label="Preset", scale=2,
                                             elem_id=f"concept-{i}-preset")
                    with gr.Row():
                        scale = gr.Slider(0, _slider_max(d["scale"], 20), value=d["scale"], step=0.1,
                                          label="Edit scale")
                        threshold = gr.Slider(0, 0.995, value=d["threshold"], step=0.005, label="Threshold")
                        warmup = gr.Slider(0, LIMITS.max_steps, value=d["warmup"], step=1, label="Warmup (steps)")
                    with gr.Row(visible=False) as advanced_row:
                        cooldown = gr.Number(None, label="Cooldown step (empty: never)", precision=0, minimum=0,
                                             maximum=LIMITS.max_steps)
                        weight = gr.Slider(0, 5, value=1.0, step=0.1, label="Weight")
                rows.append((group, advanced_row, text, direction, preset, scale, threshold, warmup, cooldown, weight))
            with gr.Row():
                add_btn = gr.Button("Add concept", size="sm", elem_id="add-concept")
                remove_btn = gr.Button("Remove last concept", size="sm", elem_id="remove-concept")

            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=service.MAX_SEED, elem_id="seed")
                randomize = gr.Checkbox(True, label="Random seed", elem_id="randomize")
            with gr.Row():
                steps = gr.Slider(1, LIMITS.max_steps, value=DEFAULTS["steps"], step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(0, service.MAX_GUIDANCE_SCALE, value=DEFAULTS["guidance_scale"], step=0.5,
                                     label="Guidance scale", elem_id="guidance")
            with gr.Row():
                size_max = min(LIMITS.max_size, 2 * NATIVE)
                width = gr.Slider(service.min_size(LOADED), size_max, value=NATIVE, step=8, label="Width")
                height = gr.Slider(service.min_size(LOADED), size_max, value=NATIVE, step=8, label="Height")
                scheduler = gr.Dropdown(list(service.SCHEDULERS), value=DEFAULTS["scheduler"], label="Scheduler")
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    momentum_scale = gr.Slider(0, 2, value=DEFAULTS["momentum_scale"], step=0.05,
                                               label="Momentum scale")
                    momentum_beta = gr.Slider(0, 0.99, value=DEFAULTS["momentum_beta"], step=0.01,
                                              label="Momentum beta")
                show_advanced = gr.Checkbox(False, label="Show cooldown and weight for each concept")
            with gr.Row():
                generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")

        with gr.Column(scale=4):
            with gr.Row():
                original_img = gr.Image(label="Without edits", format="png", interactive=False, height=260,
                                        elem_id="original")
                edited_img = gr.Image(label="With edits", format="png", interactive=False, height=260,
                                      elem_id="edited")
            slider = gr.ImageSlider(label="Before / after", format="png", interactive=False, max_height=360,
                                    elem_id="slider")
            seed_used = gr.Number(label="Seed used", precision=0, interactive=False, elem_id="seed-used")
            summary = gr.Markdown(elem_id="summary")
            with gr.Accordion("Parameters used (JSON)", open=False):
                used_json = gr.JSON(show_label=False)
            with gr.Accordion("As code", open=False):
                client_code = gr.Code(language="python", label="gradio_client (call this app)")
                library_code = gr.Code(language="python", label="sega library (run it yourself)")

    # Summary and code are derived from the JSON: cached examples store JSON faithfully, free text less so.
    ui_outputs = [original_img, edited_img, slider, seed_used, used_json]
    used_json.change(show_details, used_json, [summary, client_code, library_code], api_visibility="private")
    settings = [negative_prompt, seed, steps, guidance, width, height, scheduler, momentum_scale, momentum_beta]

    # Concept rows -------------------------------------------------------------------------------
    groups = [r[0] for r in rows]

    def show_rows(n: int) -> list:
        return [n] + [gr.Group(visible=i < n) for i in range(MAX_ROWS)]

    add_btn.click(lambda n: show_rows(min(n + 1, MAX_ROWS)), n_rows, [n_rows, *groups], api_visibility="private")
    remove_btn.click(lambda n: show_rows(max(n - 1, 0)), n_rows, [n_rows, *groups], api_visibility="private")
    show_advanced.change(lambda on: [gr.Row(visible=on) for _ in rows], show_advanced, [r[1] for r in rows],
                         api_visibility="private")
    for r in rows:
        # .input, not .change: filling a row from an example must keep the example's own values.
        r[4].input(lambda name: [PRESETS[name][k] for k in ("scale", "threshold", "warmup")], r[4],
                    [r[5], r[6], r[7]], api_visibility="private")

    # Generate -----------------------------------------------------------------------------------
    all_inputs = {prompt, randomize, n_rows, *settings, *(c for r in rows for c in r[2:])}

    def generate_ui(v: dict, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        concepts = []
        for _, _, text, direction, _, c_scale, c_threshold, c_warmup, c_cooldown, c_weight in rows[:v[n_rows]]:
            if not (v[text] or "").strip():
                continue  # an empty row is not a concept
            concepts.append({"prompt": v[text], "reverse": v[direction] == "remove", "scale": v[c_scale],
                             "threshold": v[c_threshold], "warmup": v[c_warmup], "cooldown": v[c_cooldown],
                             "weight": v[c_weight]})
        raw = {"prompt": v[prompt], "negative_prompt": v[negative_prompt], "concepts": concepts,
               "seed": None if v[randomize] else v[seed], "steps": v[steps], "guidance_scale": v[guidance],
               "width": v[width], "height": v[height], "scheduler": v[scheduler],
               "momentum_scale": v[momentum_scale], "momentum_beta": v[momentum_beta]}
        return _run_ui(raw, request)

    gen_event = gr.on([generate_btn.click, prompt.submit], generate_ui, all_inputs, ui_outputs,
                      api_visibility="private", concurrency_id="gpu", concurrency_limit="default")
    stop_btn.click(stop, None, None, cancels=[gen_event], queue=False, api_visibility="private")

    # Public API: one endpoint with named parameters, raw payloads (validated by server.service).
    with gr.Group(visible=False):
        api_inputs = [
            gr.Textbox(None, label="prompt"),
            gr.JSON([], label="concepts"),
            gr.Number(None, label="seed", precision=0),
            gr.Number(DEFAULTS["steps"], label="steps", precision=0),
            gr.Number(DEFAULTS["guidance_scale"], label="guidance_scale"),
            gr.Textbox("", label="negative_prompt"),
            gr.Number(DEFAULTS["width"], label="width", precision=0),
            gr.Number(DEFAULTS["height"], label="height", precision=0),
            gr.Number(DEFAULTS["momentum_scale"], label="momentum_scale"),
            gr.Number(DEFAULTS["momentum_beta"], label="momentum_beta"),
        ]
        api_outputs = [gr.Image(format="png", label="without edits"), gr.Image(format="png", label="with edits"),
                       gr.JSON(label="parameters used")]
        api_button = gr.Button()
    # concurrency_limit "default": the queue's default_concurrency_limit, set in launch().
    api_button.click(generate_api, api_inputs, api_outputs, api_name="generate", preprocess=False,
                     concurrency_id="gpu", concurrency_limit="default")

    # Examples: fill the form (rows included) and show a lazily cached result ---------------------
    example_concepts = gr.JSON(visible=False)

    def run_example(prompt_text, example_seed, concepts, request: gr.Request,
                    progress=gr.Progress(track_tqdm=True)):
        # Example caching hands gr.JSON values over as a pydantic model, not as plain lists.
        if hasattr(concepts, "model_dump"):
            concepts = concepts.model_dump()
        return _run_ui({"prompt": prompt_text, "seed": example_seed, "concepts": concepts}, request)

    def fill_rows(concepts: list | None) -> list:
        concepts = concepts or []
        updates = [*show_rows(len(concepts)), False]
        for i in range(MAX_ROWS):
            c = concepts[i] if i < len(concepts) else {}
            values = service.concept_defaults(LOADED, c.get("preset")) | c
            updates += [values.get("prompt", ""), "remove" if values["reverse"] else "add", values["preset"],
                        values["scale"], values["threshold"], values["warmup"], values["cooldown"], values["weight"]]
        defaults = [DEFAULTS[k] for k in ("negative_prompt", "steps", "guidance_scale", "width", "height",
                                          "scheduler", "momentum_scale", "momentum_beta")]
        return updates + defaults

    example_concepts.change(fill_rows, example_concepts,
                            [n_rows, *groups, randomize, *(c for r in rows for c in r[2:]), negative_prompt, steps,
                             guidance, width, height, scheduler, momentum_scale, momentum_beta],
                            api_visibility="private")
    gr.Examples(
        examples=[[p, s, c] for _, p, c, s in EXAMPLES],
        example_labels=[label for label, *_ in EXAMPLES],
        inputs=[prompt, seed, example_concepts],
        outputs=ui_outputs,
        fn=run_example,
        cache_examples=True,
        cache_mode="lazy",
        api_visibility="private",
    )


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
    return demo.launch(css=CSS, app_kwargs={"exception_handlers": {StarletteHTTPException: _http_error}}, **kwargs)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("model %s on %s (demo model: %s)", LOADED.model_id, LOADED.device, LOADED.is_demo)
    launch(server_name=ARGS.host, server_port=ARGS.port)
