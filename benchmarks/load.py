"""Load benchmark: the app on loopback, several gradio_client clients at once, valid and invalid requests.

    python -m benchmarks.load [--clients 8] [--requests 3] [--steps 10] [--invalid-share 0.33]
                             [--concurrency N] [--queue-size N] [--url URL] [--no-serial]

Starts the app as a server process (``python app.py``) on the bundled demo model, on 127.0.0.1 (or uses the
server at ``--url``), sends every request once from a single client (the serial reference), then has every client send
its requests at the same time, and prints throughput, latency percentiles of the valid requests, how the
invalid requests were answered and whether every concurrent answer equals the serial one pixel for pixel.

The requests: valid ones share a prompt and seed in groups and differ only in their concepts (requests whose
run without edits is the same run at the same time, and must still each get the serial answer); invalid ones (steps 0, width 33, concepts "red", a NaN scale...) must
each get an error that names the field. ``tests/test_load.py`` runs the same load and asserts on it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from server.params import API_PARAMS  # the order of /generate's inputs

PROMPTS = ("a large red circle on a white background", "a small blue square on a black background",
           "a large yellow triangle on a white background", "a small green circle on a black background")
# Concept lists that differ only in concepts; every group of one prompt and seed gets several of them.
EDITS = (
    [],
    [{"prompt": "blue", "preset": "color"}],
    [{"prompt": "black background", "preset": "background"}],
    [{"prompt": "triangle", "preset": "shape"}, {"prompt": "green", "preset": "color"}],
    [{"prompt": "large", "reverse": True, "preset": "size"}],
    [{"prompt": "red", "preset": "color", "scale": 12, "warmup": 2, "cooldown": 7, "weight": 0.5}],
)
EDITS_PER_GROUP = 3
# Groups also differ in what else they set (the cache key covers all of it).
GROUP_SETTINGS = ({}, {"width": 40, "height": 24}, {"guidance_scale": 3, "negative_prompt": "small"},
                  {"momentum_scale": 0, "steps_delta": -2})

NAN, HUGE = "__NaN__", "__huge__"  # placeholders for values gradio_client cannot send as JSON
INVALID = (
    ({"steps": 0}, "steps"),
    ({"width": 33}, "width"),
    ({"concepts": "red"}, "concepts"),
    ({"concepts": [{"prompt": "blue", "scale": NAN}]}, "concepts[0].scale"),
    ({"seed": -5}, "seed"),
    ({"concepts": [{"prompt": "blue"}, {"prompt": "red", "colour": 1}]}, "concepts[1]"),
    ({"momentum_beta": 1.5}, "momentum_beta"),
    ({"steps": HUGE}, "steps"),
    ({"concepts": [{"prompt": "blue", "threshold": 1}]}, "concepts[0].threshold"),
    ({"prompt": " \n "}, "prompt"),
)


@dataclass(frozen=True)
class LoadRequest:
    """One API call: keyword arguments of /generate; ``field`` is set for an invalid one (what its error names)."""

    kwargs: dict
    field: str | None = None

    @property
    def valid(self) -> bool:
        return self.field is None

    @property
    def raw(self) -> bool:
        """Holds a value that only a hand-written JSON body can carry (NaN, an integer beyond 1e308)."""
        text = json.dumps(self.kwargs)
        return NAN in text or HUGE in text

    def body(self) -> str:
        """The request as the JSON body of ``POST /gradio_api/call/generate``."""
        text = json.dumps({"data": [self.kwargs.get(k) for k in API_PARAMS]})
        return text.replace(f'"{NAN}"', "NaN").replace(f'"{HUGE}"', "1" + "0" * 400)


@dataclass
class Outcome:
    request: LoadRequest
    seconds: float
    error: str | None = None
    busy: bool = False
    original: np.ndarray | None = None
    edited: np.ndarray | None = None
    used: dict | None = field(default=None, repr=False)

    @property
    def names_the_field(self) -> bool:
        """An invalid request's error starts with the field's name (``concepts[1] has ...``)."""
        return self.error is not None and self.error.startswith(f"{self.request.field} ")


def valid_requests(n: int, steps: int) -> list[LoadRequest]:
    """``n`` valid requests in groups of one prompt and seed that differ only in their concepts."""
    out = []
    for k in range(n):
        group, member = divmod(k, EDITS_PER_GROUP)
        settings = dict(GROUP_SETTINGS[group % len(GROUP_SETTINGS)])
        group_steps = steps + settings.pop("steps_delta", 0)
        edits = EDITS[(group + member) % len(EDITS)]
        out.append(LoadRequest({"prompt": PROMPTS[group % len(PROMPTS)], "seed": 1000 + group,
                                "steps": max(group_steps, 1), "concepts": edits, **settings}))
    return out


def plan(clients: int, per_client: int, invalid_share: float, steps: int) -> list[list[LoadRequest]]:
    """Per client, its requests in order. About ``invalid_share`` of them are invalid, spread over the clients;
    requests of one prompt and seed go to different clients, so they run at the same time."""
    period = round(1 / invalid_share) if invalid_share > 0 else 0
    invalid_slot = [[bool(period) and (c + j) % period == 0 for j in range(per_client)] for c in range(clients)]
    n_valid = sum(not s for row in invalid_slot for s in row)
    capacity = [row.count(False) for row in invalid_slot]
    valid_for: list[list[LoadRequest]] = [[] for _ in range(clients)]
    c = 0
    for request in valid_requests(n_valid, steps):
        while len(valid_for[c]) == capacity[c]:
            c = (c + 1) % clients
        valid_for[c].append(request)
        c = (c + 1) % clients
    invalid = iter(range(10**9))
    out = []
    for c in range(clients):
        valid_iter = iter(valid_for[c])
        row = []
        for j in range(per_client):
            if invalid_slot[c][j]:
                kwargs, name = INVALID[next(invalid) % len(INVALID)]
                row.append(LoadRequest({"prompt": PROMPTS[0], "steps": steps, **kwargs}, field=name))
            else:
                row.append(next(valid_iter))
        out.append(row)
    return out


def _pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _call_raw(url: str, request: LoadRequest) -> tuple[str | None, dict | None]:
    """POST a hand-written JSON body; (error message, None) or (None, the parameters used)."""
    r = httpx.post(f"{url}gradio_api/call/generate", content=request.body(),
                   headers={"content-type": "application/json"}, timeout=60)
    if r.status_code == 503:
        raise BusyError(r.json().get("detail", "busy"))
    r.raise_for_status()
    stream = httpx.get(f"{url}gradio_api/call/generate/{r.json()['event_id']}", timeout=300).text
    event, data = None, None
    for line in stream.splitlines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and event in ("error", "complete"):
            data = json.loads(line.split(":", 1)[1])
            break
    if event == "error":
        return (data or {}).get("error") or "error", None
    return None, data[2] if isinstance(data, list) and len(data) == 3 else None


class BusyError(Exception):
    """The server's queue was full."""


def call(client, url: str, request: LoadRequest) -> Outcome:
    """Send one request; what came back and how long it took (submitting to having the images)."""
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    start = time.perf_counter()
    try:
        if request.raw:
            error, used = _call_raw(url, request)
            return Outcome(request, time.perf_counter() - start, error=error, used=used)
        original, edited, used = client.predict(api_name="/generate", **request.kwargs)
        seconds = time.perf_counter() - start
        return Outcome(request, seconds, original=_pixels(original), edited=_pixels(edited), used=used)
    except AppError as exc:
        return Outcome(request, time.perf_counter() - start, error=str(exc))
    except (QueueError, BusyError) as exc:
        return Outcome(request, time.perf_counter() - start, error=str(exc), busy=True)


def run_serial(url: str, requests: list[LoadRequest]) -> tuple[list[Outcome], float]:
    """Every request in turn from one client; the outcomes and the wall time."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    start = time.perf_counter()
    outcomes = [call(client, url, r) for r in requests]
    return outcomes, time.perf_counter() - start


def run_concurrent(url: str, per_client: list[list[LoadRequest]]) -> tuple[list[list[Outcome]], float]:
    """One gradio_client client per thread, all starting together; per client its outcomes, and the wall time."""
    from gradio_client import Client

    clients = [Client(url, verbose=False) for _ in per_client]  # connecting is not part of the load
    results: list[list[Outcome]] = [[] for _ in per_client]
    failures: list[BaseException] = []
    start_line = threading.Barrier(len(per_client) + 1)

    def work(i: int) -> None:
        start_line.wait()
        try:
            results[i] = [call(clients[i], url, r) for r in per_client[i]]
        except BaseException as exc:  # reported to the caller, never lost in a thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(per_client))]
    for t in threads:
        t.start()
    start_line.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if failures:
        raise failures[0]
    return results, seconds


def same_images(a: Outcome, b: Outcome) -> bool:
    return (a.original is not None and b.original is not None and np.array_equal(a.original, b.original)
            and a.edited is not None and b.edited is not None and np.array_equal(a.edited, b.edited))


ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def app_process(args: list[str], env: Mapping[str, str], log: Path, timeout: float = 300.0) -> Iterator[tuple[str, int]]:
    """``python <args> --host 127.0.0.1 --port <a free port>`` from the repository root, its output in ``log``;
    yields ``(url ending in "/", pid)`` once it answers, and ends it afterwards. It runs in its own process group,
    so that the ZeroGPU workers it forks end with it (a worker busy with a run outlives a SIGTERM)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    with open(log, "w") as output:
        proc = subprocess.Popen([sys.executable, *args, "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                                env=dict(env), stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    if httpx.get(url + "config", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{' '.join(args)} did not answer on {url} within {timeout:.0f} s:\n"
                                       f"{log.read_text()[-3000:]}")
                time.sleep(0.3)
            yield url, proc.pid
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass


@contextmanager
def app_server(queue_size: int | None = None, concurrency: int | None = None, steps: int | None = None,
               env: dict[str, str] | None = None, timeout: float = 120.0) -> Iterator[str]:
    """``python app.py`` on the bundled demo model and a free loopback port, as a separate process; yields its
    URL (ending in "/") and stops it afterwards."""
    from sega.demo.shapes import DEFAULT_MODEL_DIR

    child_env = {**os.environ, "SEGA_MODEL": str(DEFAULT_MODEL_DIR), "GRADIO_ANALYTICS_ENABLED": "False",
                 "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **(env or {})}
    for name, value in (("SEGA_QUEUE_SIZE", queue_size), ("SEGA_CONCURRENCY", concurrency),
                        ("SEGA_MAX_STEPS", steps)):
        if value is not None:
            child_env[name] = str(value)
    with tempfile.TemporaryDirectory() as folder, app_process(["app.py"], child_env, Path(folder) / "server.log",
                                                              timeout) as (url, _):
        yield url


def _seconds(values: list[float]) -> str:
    if not values:
        return "n/a"
    p50, p95 = np.percentile(values, [50, 95])
    return f"p50 {p50:.2f} s, p95 {p95:.2f} s, max {max(values):.2f} s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--invalid-share", type=float, default=1 / 3, help="share of invalid requests")
    parser.add_argument("--concurrency", type=int, default=None, help="generations at a time (default: SEGA_CONCURRENCY)")
    parser.add_argument("--queue-size", type=int, default=None, help="default: SEGA_QUEUE_SIZE")
    parser.add_argument("--url", default=None, help="a running server instead of starting the app here")
    parser.add_argument("--no-serial", action="store_true", help="skip the serial reference run")
    args = parser.parse_args(argv)

    import torch

    per_client = plan(args.clients, args.requests, args.invalid_share, args.steps)
    flat = [r for row in per_client for r in row]
    n_valid = sum(r.valid for r in flat)
    where = args.url or (f"python app.py on loopback (demo model, concurrency {args.concurrency or 'SEGA_CONCURRENCY'}, "
                         f"queue size {args.queue_size or 'SEGA_QUEUE_SIZE'})")
    print(f"SEGA load benchmark: {args.clients} clients x {args.requests} requests ({n_valid} valid, "
          f"{len(flat) - n_valid} invalid), {args.steps} steps; server {where}; "
          f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")

    def server():
        if args.url:
            return nullcontext(args.url.rstrip("/") + "/")
        return app_server(args.queue_size, args.concurrency)

    reference = {}
    if not args.no_serial:
        with server() as url:
            serial, serial_s = run_serial(url, [r for r in flat if r.valid])
        reference = {id(o.request): o for o in serial}
        print(f"serial (1 client): {len(serial)} valid requests in {serial_s:.2f} s = "
              f"{len(serial) / serial_s:.2f} requests/s; latency {_seconds([o.seconds for o in serial])}")
    with server() as url:  # a fresh server: the concurrent run starts from empty caches
        results, wall = run_concurrent(url, per_client)
    outcomes = [o for row in results for o in row]
    valid = [o for o in outcomes if o.request.valid]
    invalid = [o for o in outcomes if not o.request.valid]
    ok = [o for o in valid if o.error is None]
    print(f"concurrent ({args.clients} clients): {len(outcomes)} requests in {wall:.2f} s = "
          f"{len(ok) / wall:.2f} valid requests/s ({len(outcomes) / wall:.2f} requests/s in all)")
    print(f"  valid: {len(ok)} of {len(valid)} completed; latency {_seconds([o.seconds for o in ok])} "
          "(submit to images on the client, queueing included)")
    named = sum(o.names_the_field for o in invalid)
    print(f"  invalid: {sum(o.error is not None and not o.busy for o in invalid)} of {len(invalid)} answered with "
          f"an error, {named} naming the field; latency {_seconds([o.seconds for o in invalid])}")
    busy = sum(o.busy for o in outcomes)
    if busy:
        print(f"  busy (queue full): {busy}")
    if reference:
        same = sum(same_images(o, reference[id(o.request)]) for o in ok)
        print(f"  identical to the serial run (both images, pixel for pixel): {same} of {len(ok)}")
    for o in valid:
        if o.error is not None:
            print(f"  failed: {o.request.kwargs} -> {o.error}")
    for o in invalid:
        if not o.names_the_field:
            print(f"  wrong answer to an invalid request: {o.request.kwargs} -> {o.error}")


if __name__ == "__main__":
    main()
