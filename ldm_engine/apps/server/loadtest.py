"""A load test of `ldm serve`: many clients at once, over real HTTP, counting every request's fate.

    python -m ldm_engine.apps.server.loadtest --url http://127.0.0.1:7860 \
        --requests 200 --concurrency 16 [--mode native|a1111] [--steps 8]
    python -m ldm_engine.apps.server.loadtest --start-server --max-batch 8 --requests 200
    python -m ldm_engine.apps.server.loadtest --suite --append BENCHMARKS.md    # make bench-serve

A bounded number of clients (an asyncio.Semaphore over one httpx.AsyncClient) each send one
one-image txt2img request, then follow it to its end: the native API submits (POST /v1/jobs),
waits on the job's event stream (falling back to polling) and downloads every PNG; the A1111 API
(POST /sdapi/v1/txt2img) answers with the images in one response. Every request ends as exactly
one of

    completed   reached DONE and every PNG came back
    rejected    429 (queue full): the answer a client must get at once when the server is full
    failed      any other answer (4xx/5xx, FAILED or CANCELLED job, refused connection)
    lost        accepted but never finished within --job-timeout, or DONE with a PNG missing:
                a server bug; must be 0

--start-server runs `ldm serve` as a subprocess on a free loopback port (so the measurement is of a
real, separate server, not of threads sharing the client's interpreter); --suite runs the three
runs BENCHMARKS.md reports, each on its own fresh server: dynamic batching off (--max-batch 1),
on (--max-batch 8), and over capacity (a queue of 4 with more clients than that).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

FINAL_STATES = frozenset({"done", "failed", "cancelled"})
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Different prompts and seeds, same settings: what dynamic batching may put in one UNet batch.
PROMPTS = ("a red circle", "a blue square on a green background", "a yellow triangle",
           "a purple circle in the top left", "two green squares", "an orange triangle, white")

Fate = Literal["completed", "rejected", "failed", "lost"]
Mode = Literal["native", "a1111"]


@dataclass(frozen=True)
class Outcome:
    """What became of one request."""

    fate: Fate
    # Seconds from sending the request to its end: the PNGs in hand (completed), the 429 answer
    # (rejected), or the moment it was given up on.
    latency: float
    images: int = 0
    # Why, for failed and lost (one line).
    detail: str = ""
    job_id: str | None = None


@dataclass(frozen=True)
class Report:
    """One run's figures."""

    label: str
    mode: Mode
    requests: int
    concurrency: int
    steps: int
    completed: int
    rejected: int
    failed: int
    # Of the failed, those the server had accepted (a job that ended FAILED or CANCELLED).
    failed_after_accept: int
    lost: int
    images: int
    wall_seconds: float
    # Latency of the completed requests (seconds).
    p50: float | None
    p95: float | None
    p99: float | None
    # How fast a full server says so: the median and slowest 429 answer (seconds).
    reject_p50: float | None
    reject_max: float | None
    # Up to five distinct reasons for failed / lost requests.
    problems: tuple[str, ...] = ()
    server: str = ""

    @property
    def accepted(self) -> int:
        """Requests the server took on (all but 429s and errors before acceptance)."""
        return self.completed + self.lost + self.failed_after_accept

    @property
    def images_per_second(self) -> float:
        return self.images / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "accepted": self.accepted,
                "images_per_second": self.images_per_second, "problems": list(self.problems)}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank q-th percentile: the smallest value with at least q % of the values at or
    below it (so p99 of 100 values is the 99th smallest; no interpolation invents a latency that
    no request had). None for no values."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def summarise(outcomes: Sequence[Outcome], *, label: str, mode: Mode, concurrency: int,
              steps: int, wall_seconds: float, server: str = "") -> Report:
    by_fate = {fate: [o for o in outcomes if o.fate == fate]
               for fate in ("completed", "rejected", "failed", "lost")}
    latencies = [o.latency for o in by_fate["completed"]]
    rejects = [o.latency for o in by_fate["rejected"]]
    problems = tuple(dict.fromkeys(o.detail for o in outcomes if o.detail))[:5]
    return Report(label=label, mode=mode, requests=len(outcomes), concurrency=concurrency,
                  steps=steps, completed=len(by_fate["completed"]),
                  rejected=len(by_fate["rejected"]), failed=len(by_fate["failed"]),
                  lost=len(by_fate["lost"]),
                  failed_after_accept=sum(o.job_id is not None for o in by_fate["failed"]),
                  images=sum(o.images for o in by_fate["completed"]),
                  wall_seconds=wall_seconds, p50=percentile(latencies, 50),
                  p95=percentile(latencies, 95), p99=percentile(latencies, 99),
                  reject_p50=percentile(rejects, 50),
                  reject_max=max(rejects) if rejects else None, problems=problems,
                  server=server)


# --- the clients --------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class LoadSpec:
    url: str
    requests: int = 200
    concurrency: int = 16
    mode: Mode = "native"
    steps: int = 8
    sampler: str = "ddim"
    # A request not finished this long after it was sent is given up on (and counted lost).
    job_timeout: float = 300.0
    # Polling interval when a job's event stream is not available.
    poll_seconds: float = 0.1
    api_key: str | None = None
    # Requests sent (and finished) before the clock starts: the first one may load the model.
    warmup: int = 1

    def body(self, i: int) -> dict:
        prompt = PROMPTS[i % len(PROMPTS)]
        if self.mode == "a1111":
            return {"prompt": prompt, "steps": self.steps, "seed": i, "batch_size": 1,
                    "n_iter": 1, "sampler_name": "DDIM" if self.sampler == "ddim" else self.sampler}
        return {"request": {"prompt": prompt, "steps": self.steps, "seed": i,
                            "sampler": self.sampler}, "num_images": 1}


def _one_line(text: object, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _error_of(response) -> str:
    try:
        message = response.json().get("error") or response.json().get("detail")
    except (ValueError, AttributeError):
        message = response.text
    return _one_line(f"HTTP {response.status_code}: {message}")


async def _final_view(client, spec: LoadSpec, job_id: str, deadline: float) -> dict | None:
    """The job's JSON once it is in a final state (None: not by the deadline).

    The event stream tells the moment the job ends without polling load on the server; if it
    breaks or is missing, polling takes over (a job's end is in the database either way).
    """
    with contextlib.suppress(Exception):
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
                if stream.status_code == 200:
                    async for line in stream.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        with contextlib.suppress(ValueError):
                            event = json.loads(line[5:])
                            if isinstance(event, dict) and event.get("state") in FINAL_STATES:
                                break
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            response = await client.get(f"/v1/jobs/{job_id}")
            if response.status_code == 200 and response.json().get("state") in FINAL_STATES:
                return response.json()
        await asyncio.sleep(spec.poll_seconds)
    return None


async def _native(client, spec: LoadSpec, i: int) -> Outcome:
    t0 = time.monotonic()
    deadline = t0 + spec.job_timeout
    try:
        response = await client.post("/v1/jobs", json=spec.body(i))
    except Exception as e:  # refused, reset, timed out before an answer: never accepted
        return Outcome("failed", time.monotonic() - t0, detail=_one_line(f"submit: {e!r}"))
    if response.status_code == 429:
        return Outcome("rejected", time.monotonic() - t0)
    if response.status_code != 202:
        return Outcome("failed", time.monotonic() - t0, detail=_error_of(response))
    job_id = response.json()["id"]
    view = await _final_view(client, spec, job_id, deadline)
    if view is None:
        return Outcome("lost", time.monotonic() - t0, detail="not finished within "
                       f"{spec.job_timeout:g} s", job_id=job_id)
    if view["state"] != "done":
        return Outcome("failed", time.monotonic() - t0, job_id=job_id,
                       detail=_one_line(f"job {view['state']}: {view.get('error')}"))
    count = len(view.get("outputs") or ())
    if count != view.get("num_images", 1):
        return Outcome("lost", time.monotonic() - t0, job_id=job_id,
                       detail=f"DONE with {count} of {view.get('num_images')} outputs")
    for k in range(count):
        try:
            png = await client.get(f"/v1/jobs/{job_id}/images/{k}")
        except Exception as e:
            return Outcome("lost", time.monotonic() - t0, job_id=job_id,
                           detail=_one_line(f"image {k}: {e!r}"))
        if png.status_code != 200 or not png.content.startswith(PNG_SIGNATURE):
            return Outcome("lost", time.monotonic() - t0, job_id=job_id,
                           detail=f"DONE but image {k} missing (HTTP {png.status_code})")
    return Outcome("completed", time.monotonic() - t0, images=count, job_id=job_id)


async def _a1111(client, spec: LoadSpec, i: int) -> Outcome:
    t0 = time.monotonic()
    try:
        response = await client.post("/sdapi/v1/txt2img", json=spec.body(i))
    except Exception as e:
        import httpx
        # Sent and not answered in time: the server may have taken it on, so it is lost, not
        # merely failed (a connection refused never reached the server).
        fate: Fate = "lost" if isinstance(e, httpx.ReadTimeout) else "failed"
        return Outcome(fate, time.monotonic() - t0, detail=_one_line(f"txt2img: {e!r}"))
    if response.status_code == 429:
        return Outcome("rejected", time.monotonic() - t0)
    if response.status_code != 200:
        return Outcome("failed", time.monotonic() - t0, detail=_error_of(response))
    images = response.json().get("images") or []
    for k, text in enumerate(images):
        try:
            ok = base64.b64decode(text.partition(",")[2] if text.startswith("data:") else text,
                                  validate=True).startswith(PNG_SIGNATURE)
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            return Outcome("lost", time.monotonic() - t0, detail=f"200 but image {k} is no PNG")
    if not images:
        return Outcome("lost", time.monotonic() - t0, detail="200 without images")
    return Outcome("completed", time.monotonic() - t0, images=len(images))


async def run_load(spec: LoadSpec, *, label: str = "", server: str = "") -> Report:
    """Send spec.requests requests, spec.concurrency at a time, and count what became of each."""
    import httpx

    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    # Each client holds at most two connections (a job's event stream and its GETs).
    limits = httpx.Limits(max_connections=2 * spec.concurrency + 2,
                          max_keepalive_connections=2 * spec.concurrency + 2)
    timeout = httpx.Timeout(spec.job_timeout, connect=10.0)
    one = _a1111 if spec.mode == "a1111" else _native
    gate = asyncio.Semaphore(spec.concurrency)

    async def bounded(client, i):
        async with gate:
            return await one(client, spec, i)

    async with httpx.AsyncClient(base_url=spec.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=timeout) as client:
        # Warm-up requests use seeds after the measured ones, so no image is made twice.
        for w in range(spec.warmup):
            await one(client, spec, spec.requests + w)
        t0 = time.monotonic()
        outcomes = await asyncio.gather(*(bounded(client, i) for i in range(spec.requests)))
        wall = time.monotonic() - t0
    return summarise(outcomes, label=label, mode=spec.mode, concurrency=spec.concurrency,
                     steps=spec.steps, wall_seconds=wall, server=server)


# --- a real server in a subprocess -------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(*, model: Path, out_dir: Path, port: int, max_batch: int, queue_size: int,
                  extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "ldm_engine.apps.cli", "serve", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--out", str(out_dir),
            "--max-batch", str(max_batch), "--queue-size", str(queue_size), *extra]


def wait_healthy(url: str, process: subprocess.Popen | None, timeout: float,
                 log: Path | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"ldm serve exited with {process.returncode}: {tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"ldm serve did not answer {url}/healthz within {timeout:g} s")


@contextlib.contextmanager
def running_server(*, model: Path, out_dir: Path, max_batch: int, queue_size: int,
                   port: int | None = None, extra: Sequence[str] = (),
                   start_timeout: float = 180.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """`ldm serve` in a subprocess on a free loopback port; yields (base URL, process). Its
    output goes to <out_dir>/server.log; it is stopped with SIGTERM (SIGKILL after 30 s)."""
    port = port or free_port()
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as sink:
        process = subprocess.Popen(
            serve_command(model=model, out_dir=out_dir, port=port, max_batch=max_batch,
                          queue_size=queue_size, extra=extra),
            stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, start_timeout, log)
        yield url, process
    finally:
        stop_server(process)


def stop_server(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (the server finishes or re-queues its running batch), SIGKILL if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the report ---------------------------------------------------------------------------------

def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def markdown_table(reports: Sequence[Report]) -> str:
    lines = ["| run | server | requests | concurrency | accepted | completed | rejected (429) "
             "| failed | lost | images/s | p50 | p95 | p99 | 429 p50 | slowest 429 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r.label} | {r.server} | {r.requests} | {r.concurrency} | {r.accepted} "
                     f"| {r.completed} | {r.rejected} | {r.failed} | {r.lost} "
                     f"| {r.images_per_second:.2f} | {_seconds(r.p50)} | {_seconds(r.p95)} "
                     f"| {_seconds(r.p99)} | {_seconds(r.reject_p50)} "
                     f"| {_seconds(r.reject_max)} |")
    for r in reports:
        for problem in r.problems:
            lines.append(f"\n{r.label}: {problem}")
    return "\n".join(lines) + "\n"


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
            f"load average before the run {load}")


def section(reports: Sequence[Report], command: str, machine_line: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"\n### Load test, {stamp}\n\n```bash\n{command}\n```\n\n{machine_line}\n\n"
            f"{markdown_table(reports)}")


# --- the command --------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ServerRun:
    """One server for one run of the suite."""

    label: str
    max_batch: int
    queue_size: int
    concurrency: int


def suite_runs(requests: int, concurrency: int) -> tuple[ServerRun, ...]:
    # The queue holds every client's job in the first two runs (no 429 can blur the batching
    # comparison); the third has 4x more clients than queue places, so most get 429.
    return (ServerRun(label="batching off", max_batch=1, queue_size=max(64, requests),
                      concurrency=concurrency),
            ServerRun(label="batching on", max_batch=8, queue_size=max(64, requests),
                      concurrency=concurrency),
            ServerRun(label="over capacity", max_batch=8, queue_size=4,
                      concurrency=max(16, 4 * concurrency)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm_engine.apps.server.loadtest",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (otherwise --start-server or --suite)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--mode", choices=("native", "a1111"), default="native")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--job-timeout", type=float, default=300.0,
                   help="seconds a request may take before it is counted lost (default 300)")
    p.add_argument("--api-key")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests first (default 1)")
    p.add_argument("--start-server", action="store_true",
                   help="start `ldm serve` as a subprocess on a free port for the run")
    p.add_argument("--suite", action="store_true",
                   help="batching off, batching on and over capacity, each on its own server")
    p.add_argument("--model", type=Path, help="model for the started server (default: bundled)")
    p.add_argument("--max-batch", type=int, default=8, help="the started server's --max-batch")
    p.add_argument("--queue-size", type=int, default=64, help="the started server's --queue-size")
    p.add_argument("--label", default="")
    p.add_argument("--append", type=Path, help="append the markdown table to this file")
    p.add_argument("--json", action="store_true", help="print the reports as JSON too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.url or args.start_server or args.suite):
        print("loadtest: give --url, --start-server or --suite", file=sys.stderr)
        return 2
    if args.requests < 1 or args.concurrency < 1:
        print("loadtest: --requests and --concurrency must be >= 1", file=sys.stderr)
        return 2
    machine_line = machine()
    spec = LoadSpec(url=args.url or "", requests=args.requests, concurrency=args.concurrency,
                    mode=args.mode, steps=args.steps, sampler=args.sampler,
                    job_timeout=args.job_timeout, api_key=args.api_key, warmup=args.warmup)
    reports = []
    if args.url:
        reports.append(asyncio.run(run_load(spec, label=args.label or "run", server=args.url)))
    else:
        from ldm_engine.paths import BUNDLED_MODEL
        model = args.model or BUNDLED_MODEL
        runs = (suite_runs(args.requests, args.concurrency) if args.suite else
                (ServerRun(label=args.label or f"max-batch {args.max_batch}",
                           max_batch=args.max_batch, queue_size=args.queue_size,
                           concurrency=args.concurrency),))
        for run in runs:
            with tempfile.TemporaryDirectory(prefix="ldm-loadtest-") as tmp, \
                    running_server(model=model, out_dir=Path(tmp), max_batch=run.max_batch,
                                   queue_size=run.queue_size) as (url, _):
                report = asyncio.run(run_load(
                    dataclasses.replace(spec, url=url, concurrency=run.concurrency),
                    label=run.label,
                    server=f"--max-batch {run.max_batch} --queue-size {run.queue_size}"))
            reports.append(report)
            if len(runs) > 1:       # progress of the suite; the whole table follows on stdout
                print(markdown_table([report]), end="", file=sys.stderr, flush=True)
    table = markdown_table(reports)
    print(table, end="")
    if args.json:
        print(json.dumps([r.to_json() for r in reports], indent=1))
    if args.append:
        command = "python -m ldm_engine.apps.server.loadtest " + shlex.join(
            argv if argv is not None else sys.argv[1:])
        with open(args.append, "a") as f:
            f.write(section(reports, command, machine_line))
    return 1 if any(r.lost for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
