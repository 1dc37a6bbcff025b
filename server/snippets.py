"""The "as code" panel: a ``gradio_client`` call to this app and the library call, for one request.

Both are rendered from :class:`server.params.GenerationParams`: the client call from its API parameters, the
library call from :meth:`~server.params.GenerationParams.pipeline_keywords`, the same mapping that
:func:`server.service.generate` executes.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

import torch

from sega.demo.shapes import DEFAULT_MODEL_DIR

from .loading import GPU_DTYPES, pipeline_class_name
from .params import GenerationParams, Keyword


def py_literal(value) -> str:
    """A Python literal for JSON-like values (repr escapes any text safely)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{py_literal(k)}: {py_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        if not value:
            return "[]"
        return "[\n" + "".join(f"        {py_literal(v)},\n" for v in value) + "    ]"
    return repr(value)


LOCAL_URL = "http://127.0.0.1:7860/"


def app_address(space_id: str | None, headers: Mapping[str, str], url: str = "") -> str:
    """What a ``gradio_client.Client`` should connect to: the Space's name (``"owner/space"``, from
    ``$SPACE_ID``) on a Hugging Face Space, else the address the visitor used (a proxy's ``x-forwarded-host``
    and ``x-forwarded-proto``, else the ``host`` header and the app's path in ``url``, the request's address,
    of which ``/gradio_api/...`` is gradio's own part)."""
    if space_id:
        return space_id
    headers = {k.lower(): v for k, v in headers.items()}
    forwarded = headers.get("x-forwarded-host", "").split(",")[0].strip()
    host = forwarded or headers.get("host", "").strip()
    if not host:
        return LOCAL_URL
    parts = urlsplit(url)
    scheme = headers.get("x-forwarded-proto", "").split(",")[0].strip() or parts.scheme or "http"
    # Behind a proxy the request's own path is the proxy's business (as gradio's get_root_url reads it).
    path = "" if forwarded else parts.path.split("/gradio_api/")[0].rstrip("/")
    return f"{scheme}://{host}{path}/"


def client_snippet(params: GenerationParams, url: str = LOCAL_URL) -> str:
    """A ``gradio_client`` call to this app that returns the same images."""
    values = params.api_kwargs()
    lines, needs_file = [], False
    for p in params.declarations:
        if p.client_source is not None:
            lines.append(f"    {p.name}={p.client_source(values[p.name])},\n")
            needs_file = True
        else:
            lines.append(f"    {p.name}={py_literal(values[p.name])},\n")
    first, second = ("original", "edited") if params.endpoint == "generate" else ("reconstruction", "edited")
    return (
        f"from gradio_client import Client{', handle_file' if needs_file else ''}\n\n"
        f"client = Client({url!r})\n"
        f"{first}, {second}, used = client.predict(\n"
        + "".join(lines)
        + f'    api_name="/{params.endpoint}",\n)\n'
        f"print({first})\nprint({second})\n"
    )


def _call(target: str, keywords: dict) -> str:
    body = "".join(f"    {name}={keyword.source},\n" for name, keyword in keywords.items())
    return f"{target}(\n{body})\n"


def library_snippet(params: GenerationParams) -> str:
    """The ``sega`` library call(s) that return the same images (on the same device and dtype)."""
    invert, pipe = params.pipeline_keywords("invert"), params.pipeline_keywords("pipe")
    bundled = params.model in ("", str(DEFAULT_MODEL_DIR))
    cls = "SegaPipeline" if bundled else pipeline_class_name(params.model)
    imports = {"import torch", f"from sega import {cls}"}
    for keyword in (*invert.values(), *pipe.values()):
        imports.update(keyword.imports)
    if bundled:
        imports.add("from sega.demo.shapes import DEFAULT_MODEL_DIR")
    if "from sega import EditConcept" in imports:
        imports -= {"from sega import EditConcept", f"from sega import {cls}"}
        imports.add(f"from sega import EditConcept, {cls}")
    # isort order: plain imports before from-imports, third-party before ours
    third_party = sorted((i for i in imports if "sega" not in i), key=lambda i: (i.startswith("from"), i))
    ours = sorted(i for i in imports if "sega" in i)
    model_expr = "DEFAULT_MODEL_DIR" if bundled else repr(params.model)
    gpu_dtype = str(next((d for c, d in GPU_DTYPES.items() if c.__name__ == cls), torch.float16)).removeprefix("torch.")
    calls = ""
    if invert:
        calls += "inversion = " + _call("pipe.invert", invert)
        pipe = {**pipe, "inversion": Keyword("inversion", "inversion", lambda _pipe: None)}
    calls += "out = " + _call("pipe", pipe)
    first = "original" if params.endpoint == "generate" else "reconstruction"
    return (
        "\n".join(third_party) + "\n\n" + "\n".join(ours) + "\n\n"
        f"# float32 on the CPU; on a GPU use dtype=torch.{gpu_dtype} and pipe.to(\"cuda\") (as the app does there)\n"
        f"pipe = {cls}.from_pretrained({model_expr}, dtype=torch.float32)\n"
        f"{calls}"
        f'out.original_images[0].save("{first}.png")\n'
        'out.images[0].save("edited.png")\n'
    )


def as_code(params: GenerationParams, url: str = LOCAL_URL) -> tuple[str, str]:
    """Both snippets: ``(gradio_client call, library call)``."""
    return client_snippet(params, url), library_snippet(params)
