"""What every training stage shares: the accelerator, data order, checkpoints, the step loop.

Reproducibility rests on one rule: everything random in optimizer step s -- which examples form
the batch, the noise, the timesteps, the caption-dropout mask -- is drawn for the *global* batch
from a generator seeded by (seed, stage, s), and each process takes its slice. So a run resumed at
step s continues exactly as the uninterrupted run would, and 2 processes at global batch B compute
the same gradients as 1 process at batch B (DDP averages the per-process means).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm.auto import tqdm

from ldm_engine.fsutil import fsync_dir, fsync_tree

from .config import TrainConfig, to_dict

LAUNCH_LINE = ("ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 "
               "--num_machines 1 --mixed_precision no --dynamo_backend no -m train CONFIG.yaml")


def requested_processes() -> int | None:
    """--num_processes from the `accelerate launch` command line that started us, if any.

    `accelerate launch --cpu --num_processes N` runs the script once, without WORLD_SIZE, and the
    only trace of N is the launcher's own argv -- our parent process (Linux /proc).
    """
    pid = os.getppid()
    for _ in range(3):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        args = [a.decode(errors="replace") for a in argv]
        if "launch" in args and any("accelerate" in a for a in args[:3]):
            for k, a in enumerate(args):
                if a in ("--num_processes", "--num-processes") and k + 1 < len(args):
                    return int(args[k + 1])
                if a.startswith(("--num_processes=", "--num-processes=")):
                    return int(a.split("=", 1)[1])
            return None
        pid = int(stat.rsplit(")", 1)[1].split()[1])   # the parent's parent
    return None


def check_processes(accelerator: Accelerator, expected: int) -> None:
    """Refuse a launch that asked for N processes but got a different number."""
    asked = expected or requested_processes() or 0
    if asked and accelerator.num_processes != asked:
        raise RuntimeError(
            f"{asked} processes were asked for but {accelerator.num_processes} started. "
            "`accelerate launch --cpu --num_processes N` silently starts one; on CPUs launch with:\n"
            f"    {LAUNCH_LINE}")


def make_accelerator(config: TrainConfig) -> Accelerator:
    """One accelerator for the whole run (accelerate allows one state per process); stages pick
    their precision with autocast() and their accumulation with set_accumulation()."""
    root = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision="no", log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(root), logging_dir=str(root / "logs")))
    check_processes(accelerator, config.num_processes)
    flat = {}
    for section, values in to_dict(config).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": str(v) if isinstance(v, list) else v
                         for k, v in values.items()})
        else:
            flat[section] = str(values) if isinstance(values, list) else values
    accelerator.init_trackers("train", config=flat)
    return accelerator


def autocast(accelerator: Accelerator, precision: str):
    return torch.autocast(accelerator.device.type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{stage}/{step}".encode()))


def batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Examples of global batch `step`: epochs are seeded permutations, walked in order."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.extend(perm[offset: offset + batch - len(out)].tolist())
    return torch.tensor(out)


class Checkpoints:
    """step-NNNNNN folders written by accelerator.save_state, made visible only when complete.

    A checkpoint is written under a temporary name, fsynced, marked complete (state.json) and
    renamed into place; the model weights are re-read and compared before older checkpoints are
    pruned, so a crash at any moment leaves at least one good checkpoint.
    """

    def __init__(self, root: Path, keep: int):
        self.root = root
        self.keep = max(1, keep)

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / "state.json").is_file())

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, accelerator: Accelerator, step: int, model: torch.nn.Module) -> Path:
        final = self.root / f"step-{step:06d}"
        tmp = self.root / f".step-{step:06d}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "state.json").write_text(json.dumps({"step": step}))
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            self._verify(final, accelerator.unwrap_model(model))
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def _verify(path: Path, model: torch.nn.Module) -> None:
        saved = safetensors.torch.load_file(str(path / "model.safetensors"))
        live = model.state_dict()
        bad = [k for k, v in live.items() if k in saved and not torch.equal(saved[k], v.cpu())]
        if bad or not set(saved) <= set(live):
            raise RuntimeError(f"checkpoint {path} does not match the model ({bad[:3]}...)")

    @staticmethod
    def step_of(path: Path) -> int:
        return json.loads((path / "state.json").read_text())["step"]


@dataclass
class Fit:
    """One stage's optimisation loop; the stage supplies the loss and what to draw per step."""
    stage: str
    config: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module                     # prepared (possibly DDP-wrapped)
    optimizer: torch.optim.Optimizer
    scheduler: object
    steps: int
    batch: int                                 # global batch per optimizer step
    n_data: int
    # draw(global_batch, generator) -> tensors for the whole global batch, in a fixed order
    draw: Callable[[int, torch.Generator], dict[str, torch.Tensor]]
    # loss(example indices, this process's slice of the draws) -> scalar
    loss: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
    after_step: Callable[[int], None] | None = None
    # Objects with state_dict/load_state_dict saved in each checkpoint besides model/optimizer
    # (the LR schedule, an EMA). The schedule is deliberately not accelerator.prepare'd: prepared
    # schedules step once per process, which would make 2 processes decay the LR twice as fast.
    extra_state: list = field(default_factory=list)
    grad_accum: int = 1
    clip_grad: float = 1.0
    history: list[float] = field(default_factory=list)

    def run(self) -> None:
        try:
            self._run()
        finally:
            # The accelerator outlives the stage; a checkpoint of the next stage must hold only
            # that stage's model, optimizer and extra state.
            self.accelerator.free_memory()
            self.accelerator._custom_objects.clear()

    def _run(self) -> None:
        acc, cfg = self.accelerator, self.config
        acc.gradient_accumulation_steps = accum = self.grad_accum
        world = acc.num_processes
        if self.batch % (world * accum):
            raise ValueError(f"{self.stage}: global batch {self.batch} is not divisible by "
                             f"{world} processes x {accum} accumulation steps")
        micro = self.batch // (world * accum)
        ckpts = Checkpoints(Path(cfg.output_dir) / self.stage / "checkpoints", cfg.keep_checkpoints)
        for obj in [self.scheduler, *self.extra_state]:
            acc.register_for_checkpointing(obj)
        start = 0
        if cfg.resume == "latest" and (last := ckpts.latest()) is not None:
            acc.load_state(str(last))
            start = Checkpoints.step_of(last)
            acc.print(f"[{self.stage}] resumed from {last} at step {start}")
        bar = tqdm(range(start, self.steps), initial=start, total=self.steps,
                   disable=not acc.is_local_main_process, desc=self.stage)
        t_last, n_last = time.perf_counter(), start
        for step in bar:
            idx = batch_indices(self.n_data, self.batch, step, cfg.seed)
            draws = self.draw(self.batch, step_generator(cfg.seed, self.stage, step))
            # (accum, world, micro): micro-step m of process r takes one contiguous slice.
            grid = torch.arange(self.batch).view(accum, world, micro)
            total = 0.0
            for m in range(accum):
                sel = grid[m, acc.process_index]
                with acc.accumulate(self.model):
                    loss = self.loss(idx[sel], {k: v[sel] for k, v in draws.items()})
                    acc.backward(loss)
                    if acc.sync_gradients and self.clip_grad:
                        acc.clip_grad_norm_(self.model.parameters(), self.clip_grad)
                    self.optimizer.step()
                    if acc.sync_gradients:
                        self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                total += loss.detach().float().item() / accum
            if self.after_step is not None:
                self.after_step(step)
            self.history.append(total)
            done = step + 1
            if done % cfg.log_every == 0 or done == self.steps:
                now = time.perf_counter()
                rate = (done - n_last) * self.batch / (now - t_last)
                t_last, n_last = now, done
                acc.log({f"{self.stage}/loss": total,
                         f"{self.stage}/lr": self.scheduler.get_last_lr()[0],
                         f"{self.stage}/images_per_s": rate}, step=done)
                bar.set_postfix(loss=f"{total:.4f}", img_s=f"{rate:.0f}")
            if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == self.steps):
                ckpts.save(acc, done, self.model)
        bar.close()


def cosine_with_warmup(optimizer, warmup: int, steps: int):
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=min(warmup, steps // 2),
                                           num_training_steps=max(1, steps))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)
