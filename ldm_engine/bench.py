"""`make bench`: our txt2img against diffusers' pipeline, side by side, in one run.

Both engines load the same SD-1.5-architecture folder (random weights, saved once under .bench/)
and make the same image (same prompt, seed, 256x256, 10 DDIM steps, guidance 7.5, CPU fp32). Each
engine runs in its own subprocess so its peak RSS is its own. Alongside, the run measures this
CPU's fp32 matmul peak and counts the UNet's FLOPs, which gives the floor: the time the UNet alone
would take if every FLOP ran at peak matmul speed.

    python -m ldm_engine.bench --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(".bench")
PROMPT = "a photograph of an astronaut riding a horse"
SEED = 0


def ensure_model(path: Path) -> Path:
    from .components import build_random, save_model
    from .configs import SD1

    if not (path / "model_index.json").is_file():
        save_model(build_random(SD1, seed=0), path, overwrite=True)
    return path


def matmul_peak(dtype_name: str = "float32", n: int = 2048, repeats: int = 10) -> float:
    """Best-of-repeats FLOP/s of an n x n x n matmul: the ceiling for dense work on this CPU."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def unet_flops(model: Path, height: int, width: int) -> int:
    """FLOPs of one guided UNet call (batch 2: uncond + cond), counted by torch's FlopCounterMode."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(model / "unet", local_files_only=True).eval()
    x = torch.randn(2, 4, height // 8, width // 8)
    states = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor(500), encoder_hidden_states=states)
    return counter.get_total_flops()


def worker(engine: str, model: Path, steps: int, size: int, runs: int) -> dict:
    """Time one engine in this process: first call separately, then the median of `runs` calls."""
    import safetensors.torch
    import torch

    if engine == "ours":
        from pipelines import TextToImage

        pipe = TextToImage.from_folder(model)

        def generate():
            return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size,
                        width=size, seed=SEED, progress=False).pixels
    else:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None,
                                                       requires_safety_checker=False,
                                                       local_files_only=True)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        def generate():
            g = torch.Generator("cpu").manual_seed(SEED)
            out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size,
                       width=size, generator=g, output_type="np").images
            return torch.from_numpy(out).permute(0, 3, 1, 2)

    t0 = time.perf_counter()
    image = generate()
    first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        generate()
        times.append(time.perf_counter() - t0)
    safetensors.torch.save_file({"image": image.contiguous()},
                                str(BENCH_DIR / f"{engine}-{size}-{steps}.safetensors"))
    return {"engine": engine, "first_s": first, "median_s": statistics.median(times),
            "times": times, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads()}


def run_worker(engine: str, model: Path, steps: int, size: int, runs: int) -> dict:
    cmd = [sys.executable, "-m", "ldm_engine.bench", "--worker", engine, "--model", str(model),
           "--steps", str(steps), "--size", str(size), "--runs", str(runs)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(results: list[dict], flops: int, peak: float, steps: int, size: int, runs: int,
           command: str) -> str:
    import safetensors.torch
    import torch

    floor = steps * flops / peak
    ref = next(r for r in results if r["engine"] == "diffusers")
    def image(engine: str) -> torch.Tensor:
        path = BENCH_DIR / f"{engine}-{size}-{steps}.safetensors"
        return safetensors.torch.load_file(str(path))["image"]

    ours, theirs = image("ours"), image("diffusers")
    lines = [
        f"### txt2img, SD-1.5 architecture (random weights), {size}x{size}, {steps} DDIM steps, "
        f"guidance 7.5, CPU fp32",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {results[0]['torch_threads']} threads; median of {runs} runs "
        "after one warm-up call, each engine in its own process.",
        "",
        "| engine | s / image (median) | first call s | vs diffusers | peak RSS MiB | "
        "UNet floor share |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['engine']} | {r['median_s']:.2f} | {r['first_s']:.2f} | "
            f"{ref['median_s'] / r['median_s']:.2f}x | {r['peak_rss_mib']:.0f} | "
            f"{floor / r['median_s']:.0%} |")
    lines += [
        "",
        f"- UNet FLOPs per guided step (batch 2, {size // 8}x{size // 8} latents): "
        f"{flops / 1e9:.1f} GFLOP; measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s "
        "(2048^3, best of 10).",
        f"- Matmul floor for the UNet: {steps} x {flops / 1e9:.1f} GFLOP / {peak / 1e9:.0f} GFLOP/s "
        f"= {floor:.2f} s per image (text encoder and VAE decode not included). "
        "'UNet floor share' = floor / measured time.",
        f"- Same image: max |ours - diffusers| = {(ours - theirs).abs().max().item():.2e} "
        "on the [0, 1] float images.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the table into this markdown file")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", type=Path, default=BENCH_DIR / "sd15-random")
    parser.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    BENCH_DIR.mkdir(exist_ok=True)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.steps, args.size, args.runs)))
        return 0
    ensure_model(args.model)
    results = [run_worker(e, args.model, args.steps, args.size, args.runs)
               for e in ("diffusers", "ours")]
    flops = unet_flops(args.model, args.size, args.size)
    peak = matmul_peak()
    command = "make bench" if args.out else " ".join(["python -m ldm_engine.bench"] + (argv or []))
    text = report(results, flops, peak, args.steps, args.size, args.runs, command)
    print(text)
    if args.out:
        write_section(Path(args.out), "txt2img-fp32-cpu", text)
    return 0


def write_section(path: Path, key: str, text: str) -> None:
    """Replace (or append) the block between markers, so other benchmark sections are kept."""
    from .fsutil import write_bytes_atomic

    begin, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    block = f"{begin}\n{text}{end}\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    write_bytes_atomic(path, new.encode())


if __name__ == "__main__":
    sys.exit(main())
