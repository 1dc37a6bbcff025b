"""What the app must never do: run a model's code, let a visitor pick the model, serve files other than its
own outputs, keep generated files or cached runs without bound, or write a token into its log."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from benchmarks.load import app_process
from sega import SegaPipeline
from server import loading
from server import params as api
from tests.served import serve
from tests.tiny import tiny_components

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a large red circle on a white background"


@pytest.fixture
def server(app_module):  # per test: one Blocks runs one server at a time, and one test launches its own
    with serve(app_module) as url:
        yield url


def call(url: str, data: list) -> tuple[str, object]:
    """POST /gradio_api/call/generate with ``data``; (event, its data) from the result stream."""
    r = httpx.post(f"{url}gradio_api/call/generate", json={"data": data}, timeout=30)
    r.raise_for_status()
    stream = httpx.get(f"{url}gradio_api/call/generate/{r.json()['event_id']}", timeout=120).text
    event = re.search(r"^event: (\w+)", stream, re.M).group(1)
    return event, json.loads(stream.split("data:", 1)[1].strip().splitlines()[0])


def api_data(**kwargs) -> list:
    return [kwargs.get(k) for k in api.API_PARAMS]


# ------------------------------------------------------------------------------------------------
# No code from a model folder
# ------------------------------------------------------------------------------------------------


def test_no_trust_remote_code_anywhere_in_the_sources():
    sources = [ROOT / "app.py", *sorted((ROOT / "sega").rglob("*.py"))]
    assert len(sources) > 5
    offenders = [str(p.relative_to(ROOT)) for p in sources
                 if re.search(r"(trust_remote_code|custom_pipeline)\s*=", p.read_text())]
    assert offenders == []


def test_a_model_folder_with_its_own_code_is_not_run(tmp_path, monkeypatch):
    bundled = tmp_path / "bundled"
    SegaPipeline(**tiny_components()).save_pretrained(bundled)
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", bundled)
    evil = tmp_path / "evil"
    SegaPipeline(**tiny_components(seed=1)).save_pretrained(evil)
    marker = tmp_path / "the-code-ran"
    code = (f"open({str(marker)!r}, 'w').write('ran')\n"
            "from diffusers import DDIMScheduler\n\nclass Evil(DDIMScheduler):\n    pass\n")
    (evil / "scheduler" / "evil.py").write_text(code)
    index = json.loads((evil / "model_index.json").read_text())
    index["scheduler"] = ["evil", "Evil"]
    (evil / "model_index.json").write_text(json.dumps(index))

    loaded = loading.load_pipeline(str(evil), device="cpu")
    assert not marker.exists()
    assert loaded.model_id == str(bundled) and str(evil) in loaded.fallback_reason


# ------------------------------------------------------------------------------------------------
# The model is the server's choice
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_api_chooses_only_among_the_served_models(server, app_module):
    from gradio_client import Client

    info = Client(server, verbose=False).view_api(return_format="dict", print_info=False)
    names = [p["parameter_name"] for e in info["named_endpoints"].values() for p in e["parameters"]]
    assert names and not any("checkpoint" in n or "path" in n for n in names)
    assert not info["unnamed_endpoints"]
    # "model" names one of the models the server loaded, never a checkpoint to load: another id or a folder is
    # refused, naming the served ones, and nothing is loaded.
    for other in ("some/other-model", "/tmp", str(app_module.LOADED.model_id) + "/.."):
        event, data = call(server, api_data(prompt=PROMPT, steps=2, seed=1, model=other))
        assert event == "error" and data["error"].startswith("model must be one of the served models: "), data
    assert list(app_module.MODELS) == [app_module.LOADED.model_id]
    event, data = call(server, api_data(prompt=PROMPT, steps=2, seed=1, model=app_module.LOADED.model_id))
    assert event == "complete" and data[2]["model"] == app_module.LOADED.model_id
    # An extra positional value is ignored; a concept cannot carry a model either.
    event, data = call(server, [*api_data(prompt=PROMPT, steps=2, seed=1), "some/other-model"])
    assert event == "complete" and data[2]["model"] == app_module.LOADED.model_id
    event, data = call(server, api_data(prompt=PROMPT, steps=2, concepts=[{"prompt": "blue", "model": "x/y"}]))
    assert event == "error" and data["error"].startswith("concepts[0] has unknown key(s) model")


# ------------------------------------------------------------------------------------------------
# Files: only what the app generated
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_file_route_serves_generated_images_and_nothing_else(server):
    event, data = call(server, api_data(prompt=PROMPT, steps=2, seed=5))
    assert event == "complete"
    image = httpx.get(data[0]["url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")  # the route works

    cache_dir = Path(data[0]["path"]).parent
    refused = ["/etc/passwd", "app.py", str(ROOT / "app.py"), "README.md", "pyproject.toml", ".git/config",
               "assets/shapes-model/model_index.json", str(ROOT / "assets" / "screenshot.png"),
               f"{cache_dir}/../../../etc/passwd", str(Path(sys.executable).resolve()), "/proc/self/environ"]
    for path in refused:
        r = httpx.get(f"{server}gradio_api/file={quote(path, safe='')}")
        assert r.status_code in (403, 404), (path, r.status_code)
        assert b"root:" not in r.content and b"[project]" not in r.content


# ------------------------------------------------------------------------------------------------
# Generated files are deleted
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_generated_files_are_deleted_after_a_while(app_module, monkeypatch):
    frequency, age = app_module.demo.delete_cache
    assert 0 < frequency <= 3600 and 0 < age <= 24 * 3600  # configured: every 15 min, files older than 1 h

    monkeypatch.setattr(app_module.demo, "delete_cache", (1, 1))  # the same mechanism, in seconds
    with serve(app_module) as url:
        event, data = call(url, api_data(prompt=PROMPT, steps=2, seed=6))
        assert event == "complete"
        path = Path(data[1]["path"])
        assert path.exists()
        deadline = time.monotonic() + 20
        while path.exists():
            assert time.monotonic() < deadline, "the generated image was never deleted"
            time.sleep(0.2)
        assert httpx.get(data[1]["url"]).status_code == 403


# ------------------------------------------------------------------------------------------------
# Bounded caches
# ------------------------------------------------------------------------------------------------


def test_the_served_pipeline_has_a_bounded_inversion_cache(app_module):
    pipe = app_module.LOADED.pipe
    assert 0 < pipe.inversion_cache.max_entries <= 1024


# ------------------------------------------------------------------------------------------------
# No secrets in the log
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_model_that_cannot_load_falls_back_with_a_banner_and_no_token_reaches_the_log(tmp_path):
    token = "hf_FAKEtoken" + "x" * 24
    env = {**os.environ, "HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token, "GRADIO_ANALYTICS_ENABLED": "False",
           "SEGA_MODEL": str(tmp_path / "no-such-model"), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "log.txt"
    with app_process(["app.py"], env, log) as (url, _pid):
        assert call(url, api_data(prompt=PROMPT, steps=2, seed=1))[0] == "complete"  # on the demo model
        config = httpx.get(f"{url}config", timeout=30).json()
        banners = [c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "fallback-banner"]
        assert banners and "Could not load the model" in banners[0]  # the UI says it
        assert call(url, api_data(prompt=PROMPT, steps=0))[0] == "error"
    text = log.read_text()
    missing = tmp_path / "no-such-model"
    assert f"Could not load the model '{missing}'" in text and "INFO sega.app: model" in text  # the log says it
    assert token not in text and "FAKEtoken" not in text
