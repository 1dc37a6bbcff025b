"""ZeroGPU emulated on a CPU: the app started as a Space starts it, with the installed ``spaces`` package's real
ZeroGPU code (fork worker, result and error passing, the scheduler client's messages), faking only what needs
Hugging Face's infrastructure.

    python -m tests.zerogpu [app.py arguments]      # env: SPACES_ZERO_GPU=true, ZEROGPU_EMULATION_LOG=...

Without SPACES_ZERO_GPU=true it starts the plain app (as on a CPU or a GPU Space without ZeroGPU), with the
same step log, so that tests can compare the two.

Written against ``spaces`` 0.51.3 (for the test extras: ``spaces>=0.51,<0.52``). The ``spaces`` internals
replaced:

- ``spaces.zero.client.api_client``: the HTTP client of ZeroGPU's device API (``/schedule``, ``/allow``,
  ``/release``, ``/startup-report``). :class:`FakeDeviceAPI` answers instead, so ``client.schedule``,
  ``allow``, ``release`` and ``startup_report`` run as on a Space, with their own quota and no-GPU messages.
- ``spaces.zero.torch.init``, ``pack`` and ``move``: CUDA initialisation in the worker, packing the weights to
  disk at launch, and moving them to the GPU in the worker. Here the worker's "GPU" tensors are the CPU
  originals that ``spaces``' torch patching kept when the app called ``pipe.to("cuda")``.
- Before ``spaces`` is imported, on a CPU build of torch: ``torch.version.cuda`` (``spaces.zero.torch.static``
  reads it), ``torch.cuda._is_in_bad_fork`` (``spaces`` calls it in a forked process at import; a CPU build's
  is a lambda, which cannot be pickled) and ``torch._C._cuda_init`` (absent; ``spaces`` keeps it to restore),
  with named functions, never lambdas, since some are pickled to a worker.

Every call to the fake device API, every denoising step the app's generation reports, the end of each run, and
each time the app signals a run to stop, is appended as one JSON line to ``$ZEROGPU_EMULATION_LOG`` (time, pid, what), which the tests read. ``$ZEROGPU_EMULATION_CONTROL``
names a JSON file the tests write to make the next schedule answer ``{"refuse": "quota"}`` (ZeroGPU's quota
error) or ``{"refuse": "no_gpu"}`` (no GPU free), or to raise ``torch.OutOfMemoryError`` at a denoising step in
the worker (``{"oom_at_step": 2}``), or to hold the run of one seed at one step until the control file no
longer says so (``{"hold": {"seed": 5, "step": 3}}``, or a list of such: a run still going, by construction), or to make runs wait
for each other (``{"rendezvous": [51, 52]}``: the run of each of those seeds holds its first step until every
other one has logged a step, then logs ``rendezvous`` with ``met`` true; after :data:`RENDEZVOUS_TIMEOUT` s it
goes on and logs ``met`` false). Runs that met at a rendezvous provably ran at the same time, whatever the
machine's load: neither could finish before the other started.
"""

from __future__ import annotations

import base64
import json
import os
import runpy
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG_ENV = "ZEROGPU_EMULATION_LOG"
CONTROL_ENV = "ZEROGPU_EMULATION_CONTROL"
REFUSALS = ("quota", "no_gpu")
RENDEZVOUS_TIMEOUT = 240  # seconds a run waits for the others at a rendezvous (a hang guard, not a timing)


def record(event: str, **fields) -> None:
    """One JSON line in the emulation log (appends are atomic for lines this short, across processes)."""
    path = os.environ.get(LOG_ENV)
    if path:
        line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields}) + "\n"
        with open(path, "a") as f:
            f.write(line)


def read_log(path: str | Path) -> list[dict]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def control() -> dict:
    path = os.environ.get(CONTROL_ENV)
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def holds() -> list[dict]:
    """The runs the control file holds: ``{"seed": ..., "step": ...}``, one or a list."""
    hold = control().get("hold") or []
    return hold if isinstance(hold, list) else [hold]


def fake_ip_token() -> str:
    """A stand-in for the X-IP-Token header that Hugging Face adds to a Space's requests (a JWT; ``spaces``
    only decodes its payload): with it, ZeroGPU's quota message speaks of the visitor's quota."""
    payload = base64.urlsafe_b64encode(json.dumps({"sub": "emulated-visitor"}).encode()).decode().rstrip("=")
    return f"emulated.{payload}.signature"


def _not_in_bad_fork() -> bool:
    return False


def _no_cuda_init() -> None:
    raise RuntimeError("CUDA is not available on this (emulated ZeroGPU) machine")


# ----------------------------------------------------------------------------------------------
# The scheduler (ZeroGPU's device API)
# ----------------------------------------------------------------------------------------------


class FakeDeviceAPI:
    """Stands in for ``spaces.zero.api.APIClient``: grants a GPU at once, or refuses as ZeroGPU does."""

    held: set[int] = set()  # GPU indices handed out and not yet released (main process)
    tokens: dict[str, int] = {}
    lock = threading.Lock()

    def startup_report(self):
        import httpx

        record("startup_report")
        return httpx.codes.OK

    def schedule(self, cgroup_path, task_id=0, token=None, token_version=1, duration_seconds=None,
                 enable_queue=True, gpu_size=None):
        import httpx
        from spaces.zero.api import QuotaInfos, ScheduleMetadata, ScheduleResponse

        refuse = control().get("refuse")
        record("schedule", duration=duration_seconds, token=token is not None, refuse=refuse)
        if refuse == "quota":
            # What ZeroGPU answers when the requested duration exceeds what the visitor has left (HTTP 429).
            return QuotaInfos(left=10, wait=timedelta(minutes=20)), ScheduleMetadata(auth="regular")
        if refuse == "no_gpu":
            return httpx.codes.SERVICE_UNAVAILABLE, ScheduleMetadata()
        with self.lock:
            index = min(set(range(len(self.held) + 1)) - self.held)
            self.held.add(index)
            allow_token = uuid.uuid4().hex
            self.tokens[allow_token] = index
        response = ScheduleResponse(idle=True, nvidiaIndex=index, nvidiaUUID=f"GPU-emulated-{index}",
                                    allowToken=allow_token)
        return response, ScheduleMetadata()

    def allow(self, allow_token, pid):
        import httpx

        record("allow", worker=pid)
        return httpx.codes.OK

    def release(self, allow_token, fail=False):
        import httpx

        with self.lock:
            self.held.discard(self.tokens.pop(allow_token, -1))
        record("release", fail=bool(fail))
        return httpx.codes.OK


def fake_api_client() -> FakeDeviceAPI:
    return FakeDeviceAPI()


# ----------------------------------------------------------------------------------------------
# The GPU (spaces.zero.torch)
# ----------------------------------------------------------------------------------------------


def fake_cuda_init(nvidia_uuid: str) -> None:
    record("cuda_init", gpu=nvidia_uuid)


def fake_pack() -> int:
    return 0  # nothing offloaded to disk: the originals stay in memory for fake_move


def fake_move(callback=None) -> None:
    """Point every tensor that ``spaces`` made look like CUDA at its CPU original (the worker's "GPU")."""
    from spaces.zero.torch import patching

    for fake, original in patching.cuda_aliases.items():
        if original is not None:
            fake.data = original


# ----------------------------------------------------------------------------------------------
# The app's denoising steps (recorded; an out-of-memory on request)
# ----------------------------------------------------------------------------------------------


def recording_generate(real_generate):
    """``service.generate`` that logs every step and the run's end (with the pid that ran it), and can raise
    an out-of-memory at a step."""

    def generate(loaded, params, progress_callback=None, **kwargs):
        def on_step(done: int, total: int, **extra) -> None:
            record("step", done=done, total=total, seed=params.seed, stage=extra.get("stage", "denoising"),
                   preview=extra.get("preview") is not None)
            hold = {"seed": params.seed, "step": done}
            if hold in holds():  # wait here (the run's loop with it) until the test lets go
                record("held", **hold)
                deadline = time.monotonic() + 300
                while hold in holds() and time.monotonic() < deadline:
                    time.sleep(0.02)
            rendezvous = control().get("rendezvous") or ()
            if done == 1 and params.seed in rendezvous:
                wait_for_the_others(params.seed, set(rendezvous) - {params.seed})
            if control().get("oom_at_step") == done:
                import torch

                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (emulated)")
            if progress_callback is not None:
                progress_callback(done, total, **extra)

        outcome = "error"
        try:
            result = real_generate(loaded, params, progress_callback=on_step, **kwargs)
            outcome = "result"
            return result
        except BaseException as exc:
            outcome = type(exc).__name__
            raise
        finally:  # in the process that ran the loop: the run's work is over
            record("run_end", seed=params.seed, outcome=outcome)

    generate.__wrapped__ = real_generate
    return generate


def wait_for_the_others(seed: int, others: set[int]) -> None:
    """Hold this run (at its first step) until a run of every seed in ``others`` has logged a step."""
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT
    while not others <= {e.get("seed") for e in read_log(os.environ[LOG_ENV]) if e["event"] == "step"}:
        if time.monotonic() > deadline:
            record("rendezvous", seed=seed, met=False)
            return
        time.sleep(0.02)
    record("rendezvous", seed=seed, met=True)


def install_recorder() -> None:
    """Log the app's denoising steps and the moments it signals a stop (and raise an out-of-memory when the
    control file asks for one)."""
    from server import gpu, service

    service.generate = recording_generate(service.generate)
    real_set = gpu.StopSignal.set

    def recording_set(self) -> None:
        if not self.is_set():  # the moment the run is signalled (a set signal may be set again: a no-op)
            record("stop_set")
        real_set(self)

    gpu.StopSignal.set = recording_set


def install() -> None:
    """Apply the fakes (before ``spaces`` is imported: it initialises ZeroGPU at import), and the recorder."""
    if "spaces" in sys.modules:
        raise RuntimeError("install() must run before spaces is imported")
    os.environ.setdefault("SPACES_ZERO_DEVICE_API_URL", "http://127.0.0.1:9/emulated")
    import torch

    if torch.version.cuda is None:
        torch.version.cuda = "12.8"
    torch.cuda._is_in_bad_fork = _not_in_bad_fork
    if not hasattr(torch._C, "_cuda_init"):  # a CPU build has none; spaces keeps it to restore in the worker
        torch._C._cuda_init = _no_cuda_init

    import spaces  # noqa: F401  initialises ZeroGPU: patches torch so that .to("cuda") keeps CPU originals
    import spaces.zero.client
    import spaces.zero.torch

    spaces.zero.client.api_client = fake_api_client
    spaces.zero.torch.init = fake_cuda_init
    spaces.zero.torch.pack = fake_pack
    spaces.zero.torch.move = fake_move
    install_recorder()


# ----------------------------------------------------------------------------------------------
# Starting the app for a test
# ----------------------------------------------------------------------------------------------


@dataclass
class Served:
    """An app started by :func:`serve_app`: its URL, its pid, and the emulation's log and control file."""

    url: str
    pid: int
    log: Path
    control_file: Path

    def events(self, since: int = 0) -> list[dict]:
        return read_log(self.log)[since:]

    def mark(self) -> int:
        """A position in the log; ``events(mark)`` is what happened since."""
        return len(read_log(self.log))

    def control(self, **values) -> None:
        staging = self.control_file.with_suffix(".tmp")
        staging.write_text(json.dumps(values))
        os.replace(staging, self.control_file)  # whole: a run may be reading it (a hold) at any moment

    def wait_until_every_gpu_is_released(self, timeout: float = 300) -> None:
        """Until every GPU granted so far has been released: a run that an earlier test stopped or abandoned
        may still hold one, and a call scheduled meanwhile gets another GPU, so another worker (spaces keeps
        one worker per GPU index). Ordering by the log, not by time."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.events()
            granted = sum(e["event"] == "schedule" and not e.get("refuse") for e in events)
            if granted == sum(e["event"] == "release" for e in events):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{granted} GPUs granted, not all released after {timeout} s")
            time.sleep(0.05)


@contextmanager
def serve_app(folder: Path, zero_gpu: bool, env: dict[str, str] | None = None,
              timeout: float = 300) -> Iterator[Served]:
    """``python app.py`` on the bundled demo model, as on a ZeroGPU Space (emulated) or as on a CPU."""
    from benchmarks.load import app_process  # here: the launcher process must not import it before spaces
    from sega.demo.shapes import DEFAULT_MODEL_DIR

    log, control_file = folder / "log.jsonl", folder / "control.json"
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "TQDM_DISABLE": "1", "SEGA_MODEL": str(DEFAULT_MODEL_DIR), LOG_ENV: str(log),
               "GRADIO_EXAMPLES_CACHE": str(folder / "examples"),  # not the checkout's .gradio/
               CONTROL_ENV: str(control_file), "PYTHONPATH": str(ROOT)}
    environ.pop("SPACES_ZERO_GPU", None)
    if zero_gpu:
        environ["SPACES_ZERO_GPU"] = "true"
    environ.update(env or {})
    with app_process(["-m", "tests.zerogpu"], environ, folder / "server.log", timeout) as (url, pid):
        yield Served(url=url, pid=pid, log=log, control_file=control_file)


def main(argv: list[str]) -> None:
    """``python app.py`` with the emulation (SPACES_ZERO_GPU=true), else with only the step recorder."""
    if os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true"):
        install()
        # The emulated GPU is this CPU: it runs the model in float32, not the Space's float16, which a CPU runs
        # about 8 times slower and which says nothing about how runs go (tests/server/test_service.py checks
        # which dtype a real GPU gets).
        import torch

        from server import loading

        loading.DEFAULT_GPU_DTYPE = torch.float32
    else:
        install_recorder()
    record("launch")
    sys.argv = [str(ROOT / "app.py"), *argv]
    sys.path.insert(0, str(ROOT))
    runpy.run_path(str(ROOT / "app.py"), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
