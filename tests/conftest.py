"""Test tiers and shared settings.

Two tiers (docs/testing.md): `python -m pytest -m "not slow"` is the fast tier to run while developing (library,
server and form tests on tiny components: no app start-up, no browser, no training, no demo-model evaluation);
`python -m pytest` (and `bash .ci/run`) runs everything. Which tests are slow is decided here, in one place, by
the rule in :func:`is_slow`; a module may still say ``pytestmark = pytest.mark.slow`` itself.
"""

from __future__ import annotations

import os
import warnings

import pytest
from hypothesis import settings

warnings.filterwarnings("ignore", category=FutureWarning)

# No test may reach a model hub (none is reachable here, and a test that tried would wait for time-outs): the hub
# clients answer from local files or fail at once. Set before anything imports huggingface_hub.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

# Under pytest-xdist each worker gets its share of the cores for torch, and the app servers and ZeroGPU workers it
# starts inherit it: with torch's default (a thread per core) in every worker, OpenMP's threads spin against each
# other and every test runs many times slower (the whole suite took 25 min instead of about 8 on 2 cores). Set before
# anything imports torch; images compared pixel for pixel come from processes with the same count.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# Fixtures whose tests are end-to-end: they start the app (importing app.py builds the whole UI and loads the
# demo model), serve it, run it as on ZeroGPU, or evaluate the demo model. Browser tests use these too.
SLOW_FIXTURES = {
    "app_module": "starts the app", "server": "serves the app", "client": "serves the app",
    "sdxl_server": "serves the app", "flux_server": "serves the app", "space": "runs the app as on ZeroGPU",
    "evaluator": "evaluates the demo model",
}

# Tests that run the real demo model at length, train one or import the library anew, by node id prefix.
SLOW_TESTS = {
    "tests/benchmarks/": "runs the benchmark scripts end to end",
    "tests/demo/test_shapes.py::test_training_": "trains a demo model",
    "tests/demo/test_editing.py::test_the_edit_tabs_examples": "inverts and edits every example upload",
    "tests/demo/test_previews.py::": "fits the preview map to the VAE; denoises 20 steps",
    "tests/test_layout.py::test_the_library_imports_without_gradio_or_spaces": "imports the library in a new process",
}

# Hypothesis: fewer examples in the fast tier, the full count when the whole suite runs.
settings.register_profile("fast", max_examples=50, deadline=None)
settings.register_profile("full", max_examples=1000, deadline=None)


def is_slow(item: pytest.Item) -> bool:
    node = item.nodeid.replace(os.sep, "/")
    return bool(SLOW_FIXTURES.keys() & set(getattr(item, "fixturenames", ()))) or node.startswith(tuple(SLOW_TESTS))


def pytest_configure(config):
    # An explicit --hypothesis-profile wins; else the tier decides.
    if config.getoption("hypothesis_profile", None) is None:
        fast = "not slow" in (config.getoption("markexpr", "") or "")
        settings.load_profile("fast" if fast else "full")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by mark
def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_slow(item):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
