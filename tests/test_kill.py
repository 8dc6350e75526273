"""SIGKILL `ldm convert SRC DST --overwrite` while it replaces DST: DST is always a whole model.

Two tiny models (random seeds 0 and 1) take turns as SRC, so after each kill DST must load
(`load_state`) as exactly the model it held before the run or exactly the run's SRC, never a mix
and never missing. After a final clean run no temporaries remain beside DST.

Kill moments: half are uniform over a whole run (start-up included), half are aimed at the write
itself: once the run's temporary folder appears, after a uniform delay within the time that
writing, verifying and replacing took in a clean run.

The slow test runs the real `ldm` executable, 24 kills: each run spends about 9 s of CPU on
start-up, so the test took 620 s (150 s of CPU) on the 2-core machine shared with other test
runs. The fast one kills children of a forkserver that has imported the engine once, so each
run is the conversion alone, through the same `main()` and argv: 5 kills, 10 s of CPU (41 s
wall under the same load, a third of it the forkserver's imports).
"""

import contextlib
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm_engine.components import build_random, save_model
from ldm_engine.configs import TINY
from ldm_engine.convert import convert, load_state

LDM = Path(sys.executable).with_name("ldm")
NETWORKS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def sources(tiny_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("models") / "tiny-seed1"
    save_model(build_random(TINY, seed=1), other)
    return {"A": tiny_dir, "B": other}


def fingerprint(folder: Path) -> dict:
    state = load_state(folder)
    return {net: getattr(state, net) for net in NETWORKS}


def same(a: dict, b: dict) -> bool:
    return all(a[net].keys() == b[net].keys()
               and all(torch.equal(a[net][k], b[net][k]) for k in a[net]) for net in NETWORKS)


def which(folder: Path, models: dict) -> str | None:
    got = fingerprint(folder)
    return next((name for name, want in models.items() if same(got, want)), None)


class LdmProcess:
    """`ldm convert` as a real executable."""

    def __init__(self, src: Path, dst: Path):
        self.proc = subprocess.Popen([str(LDM), "convert", str(src), str(dst), "--overwrite"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.pid = self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def wait(self) -> int:
        err = self.proc.communicate()[1]
        assert self.proc.returncode in (0, -signal.SIGKILL), err.decode()
        return self.proc.returncode


def forked_convert(argv: list[str]) -> None:
    from ldm_engine.apps.cli import main
    sys.exit(main(argv))


class ForkedMain:
    """`ldm_engine.apps.cli.main(["convert", ...])` in a child of a preloaded forkserver."""

    context = None

    def __init__(self, src: Path, dst: Path):
        if ForkedMain.context is None:
            ForkedMain.context = multiprocessing.get_context("forkserver")
            ForkedMain.context.set_forkserver_preload(["ldm_engine.apps.cli", "ldm_engine.convert"])
        self.proc = ForkedMain.context.Process(
            target=forked_convert, args=(["convert", str(src), str(dst), "--overwrite"],))
        self.proc.start()
        self.pid = self.proc.pid

    def running(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):     # already exited (and reaped)
            os.kill(self.proc.pid, signal.SIGKILL)

    def wait(self) -> int:
        self.proc.join()
        assert self.proc.exitcode in (0, -signal.SIGKILL), self.proc.exitcode
        return self.proc.exitcode


def temporaries(dst: Path, pid: int | None = None) -> list[str]:
    """Names beside dst; with pid, only the temporaries that process made (their names carry
    it; a killed run's stay until the next run removes them)."""
    return [p.name for p in dst.parent.iterdir() if p.name != dst.name
            and (pid is None or f"-{pid}-" in p.name)]


def clean_run(runner, src: Path, dst: Path) -> tuple[float, float]:
    """(seconds until the temporary folder appeared, seconds from then to the end)."""
    start = time.monotonic()
    run = runner(src, dst)
    appeared = None
    while run.running():
        if appeared is None and temporaries(dst, run.pid):
            appeared = time.monotonic()
        time.sleep(0.002)
    end = time.monotonic()
    assert run.wait() == 0
    appeared = appeared or end
    return appeared - start, end - appeared


def kill_run(runner, src: Path, dst: Path, rng: random.Random, timing: tuple[float, float],
             aimed: bool) -> bool:
    """Start a run and SIGKILL it at a random moment; whether it was still running."""
    startup, write = timing
    run = runner(src, dst)
    if aimed:                                  # wait for the write to begin, then a bit
        while run.running() and not temporaries(dst, run.pid):
            time.sleep(0.001)
        time.sleep(rng.uniform(0, write))
    else:
        time.sleep(rng.uniform(0, startup + write))
    killed = run.running()
    run.kill()
    run.wait()
    return killed


def kill_many(runner, sources: dict, tmp_path: Path, kills: int) -> dict:
    models = {name: fingerprint(path) for name, path in sources.items()}
    dst = tmp_path / "out" / "model"
    convert(sources["A"], dst)
    current = "A"
    timing = clean_run(runner, sources["B"], dst)
    current = "B"
    assert which(dst, models) == "B"
    rng = random.Random(1234)
    done = attempts = 0
    outcomes = {"old": 0, "new": 0}
    while done < kills:
        attempts += 1
        assert attempts < 4 * kills, "runs keep finishing before the kill"
        target = "A" if current == "B" else "B"
        killed = kill_run(runner, sources[target], dst, rng, timing, aimed=attempts % 2 == 0)
        got = which(dst, models)
        assert got in (current, target), f"after kill {done}: DST is neither model ({got})"
        if killed:
            done += 1
            outcomes["old" if got == current else "new"] += 1
        current = got
    target = "A" if current == "B" else "B"
    clean_run(runner, sources[target], dst)
    assert which(dst, models) == target
    assert temporaries(dst) == [], "stale temporaries after a clean run"
    return outcomes


def test_kill_forked_convert_while_replacing(sources, tmp_path):
    outcomes = kill_many(ForkedMain, sources, tmp_path, kills=5)
    assert sum(outcomes.values()) == 5


@pytest.mark.slow
def test_kill_ldm_convert_while_replacing(sources, tmp_path):
    assert LDM.is_file(), f"{LDM} is not installed"
    outcomes = kill_many(LdmProcess, sources, tmp_path, kills=24)
    assert sum(outcomes.values()) == 24
