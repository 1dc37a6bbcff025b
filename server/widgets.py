"""The app's widgets as its declarations make them: a parameter's control (server/form.py's ranges and
defaults), the concept rows with their presets, the result column, the upload box."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from . import form
from . import params as api
from .limits import Limits
from .loading import LoadedModel


def mask_choice(loaded: LoadedModel, endpoint: str, elem_id: str) -> gr.Radio:
    """The "mask" parameter's control, from its declaration (choices, default of the model and endpoint)."""
    own_presets = (" With masks the presets have values of their own: choosing a mode refills the concepts' "
                   "numbers from their presets." if loaded.profile.presets.has_masked(endpoint) else "")
    return gr.Radio(list(api.MASK_MODES), value=api.defaults(loaded, endpoint)["mask"], elem_id=elem_id,
                    label="Masks (LEDITS++): where each concept may edit",
                    info="none: SEGA's threshold per latent channel; cross-attention: only where the concept's "
                         "words attend (the threshold is the share of that map left out); intersect: there and "
                         "where its edit is strong. The masks are shown beside the result." + own_presets)


@dataclass
class ConceptRow:
    """The widgets of one concept row."""

    group: gr.Group
    advanced: gr.Row  # cooldown and weight, shown with "Show cooldown and weight"
    text: gr.Textbox
    direction: gr.Radio
    preset: gr.Dropdown
    scale: gr.Slider
    threshold: gr.Slider
    warmup: gr.Slider
    cooldown: gr.Number
    weight: gr.Slider

    @property
    def values(self) -> list[gr.components.Component]:
        return [self.text, self.direction, self.preset, self.scale, self.threshold, self.warmup, self.cooldown,
                self.weight]

    def read(self, v: dict) -> dict | None:
        """This row as an API concept, or None when its text is empty (an empty row is not a concept)."""
        if not (v[self.text] or "").strip():
            return None
        return {"prompt": v[self.text], "reverse": v[self.direction] == "remove", "scale": v[self.scale],
                "threshold": v[self.threshold], "warmup": v[self.warmup], "cooldown": v[self.cooldown],
                "weight": v[self.weight]}

    def fill(self, values: dict) -> dict:
        """Widget values for an API concept with every key filled in (a missing prompt clears the row)."""
        return {self.text: values.get("prompt", ""), self.direction: "remove" if values["reverse"] else "add",
                self.preset: values["preset"], self.scale: values["scale"], self.threshold: values["threshold"],
                self.warmup: values["warmup"], self.cooldown: values["cooldown"], self.weight: values["weight"]}


class ConceptRows:
    """Up to the model's most concepts in rows, with add/remove buttons, presets and a cooldown/weight switch.

    ``prefix`` keeps element ids apart when several tabs each have their rows.
    """

    def __init__(self, loaded: LoadedModel, limits: Limits, prefix: str = "concept", endpoint: str = "generate"):
        self.endpoint, self.profile = endpoint, loaded.profile
        self.mask = api.defaults(loaded, endpoint)["mask"]  # the form's mask mode at the start and after an example
        max_rows = limits.max_concepts
        presets = self.profile.presets.table(endpoint, self.mask)
        self.count = gr.State(1)
        self.rows: list[ConceptRow] = []
        d = self.profile.concept_defaults(endpoint=endpoint, mask=self.mask)
        w = form.concept_widgets(loaded, limits, endpoint)
        for i in range(max_rows):
            with gr.Group(visible=i == 0, elem_id=f"{prefix}-{i}") as group:
                with gr.Row():
                    text = gr.Textbox(label=f"Concept {i + 1}", scale=3, elem_id=f"{prefix}-{i}-text",
                                      placeholder=self.profile.concept_placeholder)
                    direction = gr.Radio(["add", "remove"], value="add", label="Direction", scale=2,
                                         elem_id=f"{prefix}-{i}-direction")
                    preset = gr.Dropdown(list(presets), value=d["preset"], label="Preset", scale=2,
                                         elem_id=f"{prefix}-{i}-preset")
                with gr.Row():
                    scale = slider(w["scale"], elem_id=f"{prefix}-{i}-scale")
                    threshold = slider(w["threshold"], elem_id=f"{prefix}-{i}-threshold")
                    warmup = slider(w["warmup"], elem_id=f"{prefix}-{i}-warmup")
                with gr.Row(visible=False) as advanced:
                    cooldown = number_box(w["cooldown"], elem_id=f"{prefix}-{i}-cooldown")
                    weight = slider(w["weight"], elem_id=f"{prefix}-{i}-weight")
            self.rows.append(ConceptRow(group, advanced, text, direction, preset, scale, threshold, warmup,
                                        cooldown, weight))
        with gr.Row():
            add = gr.Button("Add concept", size="sm", elem_id=f"add-{prefix}")
            remove = gr.Button("Remove last concept", size="sm", elem_id=f"remove-{prefix}")
        groups = [r.group for r in self.rows]
        add.click(lambda n: self.show(min(n + 1, max_rows)), self.count, [self.count, *groups],
                  api_visibility="private")
        remove.click(lambda n: self.show(max(n - 1, 0)), self.count, [self.count, *groups], api_visibility="private")

    def wire_presets(self, mask: gr.Radio | None) -> None:
        """A preset fills its row's numbers from the table of the mask mode chosen (no mask control: a model
        without masks, "none"); where masked edits have presets of their own, choosing another mask mode refills
        every row from its preset."""
        keys = ("scale", "threshold", "warmup")

        def numbers(name: str, mode: str = "none") -> list:
            return [self.profile.presets.table(self.endpoint, mode)[name][k] for k in keys]

        for row in self.rows:
            # .input, not .change: filling a row from an example must keep the example's own values.
            row.preset.input(numbers, [row.preset] + ([mask] if mask is not None else []),
                             [row.scale, row.threshold, row.warmup], api_visibility="private")
        if mask is not None and self.profile.presets.has_masked(self.endpoint):
            mask.input(lambda mode, *names: [v for name in names for v in numbers(name, mode)],
                       [mask, *(r.preset for r in self.rows)],
                       [w for r in self.rows for w in (r.scale, r.threshold, r.warmup)], api_visibility="private")

    def show(self, n: int) -> dict:
        return {self.count: n, **{r.group: gr.Group(visible=i < n) for i, r in enumerate(self.rows)}}

    def wire_advanced(self, switch: gr.Checkbox) -> None:
        switch.change(lambda on: [gr.Row(visible=on) for _ in self.rows], switch, [r.advanced for r in self.rows],
                      api_visibility="private")

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [self.count, *(c for r in self.rows for c in r.values)]

    @property
    def outputs(self) -> list:
        return [self.count, *(r.group for r in self.rows), *(c for r in self.rows for c in r.values)]

    def read(self, v: dict) -> list[dict]:
        return [c for c in (r.read(v) for r in self.rows[:v[self.count]]) if c is not None]

    def fill(self, concepts: list[dict]) -> dict:
        updates = self.show(len(concepts))
        for i, row in enumerate(self.rows):
            concept = concepts[i] if i < len(concepts) else {}
            updates |= row.fill(self.profile.concept_defaults(concept.get("preset"), self.endpoint, self.mask)
                                | concept)
        return updates


def result_column(first_label: str, prefix: str) -> dict:
    """The images side by side, the before/after slider, the seed, summary, JSON and "as code"."""
    with gr.Row():
        first = gr.Image(label=first_label, format="png", interactive=False, height=260, elem_id=f"{prefix}original",
                         elem_classes="pixelated", type="filepath")
        edited = gr.Image(label="With edits", format="png", interactive=False, height=260, elem_id=f"{prefix}edited",
                          elem_classes="pixelated", type="filepath")
    slider = gr.ImageSlider(label="Before / after", format="png", interactive=False, max_height=360,
                            elem_id=f"{prefix}slider", elem_classes="pixelated")
    seed_used = gr.Number(label="Seed used", precision=0, interactive=False, elem_id=f"{prefix}seed-used")
    masks = gr.Gallery(label="Where each concept edited (its mask over the image with edits)", columns=4,
                       height=160, object_fit="contain", interactive=False, visible=False, elem_id=f"{prefix}masks",
                       elem_classes="pixelated")
    summary = gr.Markdown(elem_id=f"{prefix}summary")
    with gr.Accordion("Parameters used (JSON)", open=False):
        used = gr.JSON(show_label=False)
    with gr.Accordion("As code", open=False):
        client_code = gr.Code(language="python", label="gradio_client (call this app)", elem_id=f"{prefix}client-code")
        library_code = gr.Code(language="python", label="sega library (run it yourself)",
                               elem_id=f"{prefix}library-code")
    return {"images": [first, edited, slider, seed_used, used], "details": [summary, client_code, library_code],
            "used": used, "edited": edited, "seed_used": seed_used, "masks": masks}


def hand_over_untouched(image: gr.Image) -> gr.Image:
    """``image`` (an upload box) gives its handlers the uploaded file as it is, a path: server/images.py checks
    its size and header, then reads it. ``gr.Image(type="filepath")``'s own preprocess opens every upload with
    PIL first (a header claiming too many pixels fails there, with gradio's generic error) and re-saves it when
    its mode is not ``image_mode``. (Set on the instance: a subclass of a gradio component makes gradio write
    an ``app.pyi`` next to this file.)"""
    own = image.preprocess

    def preprocess(payload):
        if payload is None or payload.path is None:  # nothing, or a data URL: gr.Image's own way
            return own(payload)
        return payload.path

    image.preprocess = preprocess
    return image


def slider(widget: form.Widget, **kwargs) -> gr.Slider:
    """A slider as server/form.py declares it."""
    return gr.Slider(widget.low, widget.high, value=widget.default, step=widget.step, label=widget.label,
                     info=widget.info, **kwargs)


def number_box(widget: form.Widget, **kwargs) -> gr.Number:
    """A number box as server/form.py declares it (empty when its default is None)."""
    return gr.Number(widget.default, label=widget.label, info=widget.info, minimum=widget.low,
                     maximum=widget.high, step=widget.step, precision=0 if widget.integer else None, **kwargs)


def seed_row(prefix: str, widgets: dict[str, form.Widget]) -> tuple[gr.Number, gr.Checkbox]:
    with gr.Row():
        seed = number_box(widgets["seed"], elem_id=f"{prefix}seed")
        randomize = gr.Checkbox(True, label="Random seed", elem_id=f"{prefix}randomize")
    return seed, randomize


def momentum_sliders(widgets: dict[str, form.Widget], prefix: str) -> tuple[gr.Slider, gr.Slider]:
    with gr.Row():
        scale = slider(widgets["momentum_scale"], elem_id=f"{prefix}momentum-scale")
        beta = slider(widgets["momentum_beta"], elem_id=f"{prefix}momentum-beta")
    return scale, beta
