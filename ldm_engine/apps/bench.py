"""`make bench`: our txt2img against diffusers' pipeline, side by side, in one run.

Every engine loads the same SD-1.5-architecture folder (random weights, saved once under .bench/)
and makes the same image (same prompt and seed, DDIM, guidance 7.5) at each size and step count:
diffusers fp32 and bf16, ours fp32, and our fast path (bf16 eager, bf16 AOT-compiled, and the
approximate deep cache). Each engine runs in its own subprocess so its peak RSS is its own.
Alongside, the run measures this CPU's fp32 and bf16 matmul peaks and counts the UNet's FLOPs,
which gives the floor: the time a UNet step would take if every FLOP ran at peak matmul speed.

    python -m ldm_engine.apps.bench --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

BENCH_DIR = Path(".bench")
PROMPT = "a photograph of an astronaut riding a horse"
SEED = 0


def ensure_model(path: Path) -> Path:
    from ldm_engine.components import build_random, save_model
    from ldm_engine.configs import SD1

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


@dataclass(frozen=True)
class Engine:
    name: str
    library: str                 # "ours" or "diffusers"
    dtype: str                   # "fp32" or "bf16"
    compile: bool = False
    deep_cache: int = 1
    cold: bool = False           # compile into an empty cache first (measures the one-time cost)
    # torch's allocator on transparent huge pages (THP_MEM_ALLOC_ENABLE): our engine turns it on,
    # a plain diffusers process does not have it.
    huge_pages: bool = True

    @property
    def approximate(self) -> bool:
        return self.deep_cache > 1


ENGINES = {e.name: e for e in (
    Engine("diffusers-fp32", "diffusers", "fp32", huge_pages=False),
    Engine("diffusers-fp32-hugepages", "diffusers", "fp32"),
    Engine("diffusers-bf16", "diffusers", "bf16", huge_pages=False),
    Engine("ours-fp32", "ours", "fp32"),
    Engine("ours-bf16", "ours", "bf16"),
    Engine("ours-bf16-compiled", "ours", "bf16", compile=True),
    Engine("ours-bf16-compiled-deepcache3", "ours", "bf16", compile=True, deep_cache=3),
)}


def worker(engine: Engine, model: Path, steps: int, size: int, runs: int) -> dict:
    """Time one engine in this process: first call separately, then the median of `runs` calls,
    then the guided UNet call alone (batch 2) as the engine runs it."""
    import safetensors.torch
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[engine.dtype]
    start = time.perf_counter()
    if engine.library == "ours":
        from pipelines import TextToImage

        pipe = TextToImage.from_folder(model, dtype=dtype, compile=engine.compile,
                                       deep_cache=engine.deep_cache)

        def generate():
            return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size,
                        width=size, seed=SEED, progress=False).pixels

        def unet_step(x, t, states):
            return pipe.denoiser()(x, t, states)

        cross_dim = pipe.components.unet.config.cross_attention_dim
    else:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None,
                                                       requires_safety_checker=False,
                                                       local_files_only=True, torch_dtype=dtype)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        def generate():
            g = torch.Generator("cpu").manual_seed(SEED)
            out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size,
                       width=size, generator=g, output_type="np").images
            return torch.from_numpy(out).permute(0, 3, 1, 2)

        def unet_step(x, t, states):
            return pipe.unet(x.to(dtype), t, encoder_hidden_states=states.to(dtype)).sample

        cross_dim = pipe.unet.config.cross_attention_dim
    load = time.perf_counter() - start

    t0 = time.perf_counter()
    with torch.inference_mode():
        image = generate()
    first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        with torch.inference_mode():
            generate()
        times.append(time.perf_counter() - t0)
    step = None
    if not engine.approximate:
        x = torch.randn(2, 4, size // 8, size // 8)
        states = torch.randn(2, 77, cross_dim, dtype=dtype)
        t = torch.tensor(500)
        step_times = []
        with torch.inference_mode():
            for _ in range(4):
                t0 = time.perf_counter()
                unet_step(x, t, states)
                step_times.append(time.perf_counter() - t0)
        step = statistics.median(step_times[1:])
    safetensors.torch.save_file({"image": image.float().contiguous()},
                                str(BENCH_DIR / f"{engine.name}-{size}-{steps}.safetensors"))
    return {"engine": engine.name, "load_s": load, "first_s": first,
            "median_s": statistics.median(times), "times": times, "unet_step_s": step,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads()}


def run_worker(engine: Engine, model: Path, steps: int, size: int, runs: int) -> dict:
    cmd = [sys.executable, "-m", "ldm_engine.apps.bench", "--worker", engine.name, "--model",
           str(model), "--steps", str(steps), "--size", str(size), "--runs", str(runs)]
    env = dict(os.environ, LDM_CACHE_DIR=str(BENCH_DIR / "cache"),
               THP_MEM_ALLOC_ENABLE="1" if engine.huge_pages else "0")
    if engine.cold:
        shutil.rmtree(BENCH_DIR / "cache", ignore_errors=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(f"  {engine.name} {size}px {steps} steps: {result['median_s']:.2f} s/image "
          f"(first {result['first_s']:.2f} s)", file=sys.stderr, flush=True)
    return result


def psnr(a, b) -> float:
    import math

    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def report(results: list[dict], flops: int, peaks: dict[str, float], steps: int, size: int,
           runs: int, cold_first: float | None) -> str:
    import safetensors.torch
    import torch

    def image(name: str) -> torch.Tensor:
        path = BENCH_DIR / f"{name}-{size}-{steps}.safetensors"
        return safetensors.torch.load_file(str(path))["image"]

    ref_image = image("diffusers-fp32")
    ref = next(r for r in results if r["engine"] == "diffusers-fp32")
    bf16_ref = next((r for r in results if r["engine"] == "diffusers-bf16"), None)
    lines = [
        f"#### {size}x{size}, {steps} DDIM steps",
        "",
        "| engine | s / image (median) | first call s | vs diffusers fp32 | vs diffusers bf16 | "
        "peak RSS MiB | UNet step s | UNet TFLOP/s | x matmul floor | PSNR vs fp32 dB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        engine = ENGINES[r["engine"]]
        peak = peaks[engine.dtype]
        step = r["unet_step_s"]
        unet_cols = ("n/a (approx.)", "n/a", "n/a") if step is None else (
            f"{step:.3f}", f"{flops / step / 1e12:.3f}", f"{step / (flops / peak):.2f}x")
        vs_bf16 = f"{bf16_ref['median_s'] / r['median_s']:.2f}x" if bf16_ref else "-"
        quality = psnr(image(engine.name), ref_image)
        label = engine.name + (" (approximate)" if engine.approximate else "")
        lines.append(
            f"| {label} | {r['median_s']:.2f} | {r['first_s']:.2f} | "
            f"{ref['median_s'] / r['median_s']:.2f}x | {vs_bf16} | {r['peak_rss_mib']:.0f} | "
            f"{unet_cols[0]} | {unet_cols[1]} | {unet_cols[2]} | "
            f"{'identical' if quality == float('inf') else f'{quality:.1f}'} |")
    lines += [
        "",
        f"- UNet FLOPs per guided step (batch 2, {size // 8}x{size // 8} latents): "
        f"{flops / 1e9:.1f} GFLOP. Matmul floor per step: {flops / peaks['fp32']:.3f} s fp32, "
        f"{flops / peaks['bf16']:.3f} s bf16.",
    ]
    if cold_first is not None:
        lines.append(f"- Compiled, empty cache: the first call took {cold_first:.1f} s (AOT "
                     "compile of the UNet for this size, once per model and "
                     "size); the table's first call is a new process loading the cached packages.")
    return "\n".join(lines) + "\n"


def vae_native(pipe) -> int:
    return pipe.components.vae.config.sample_size


def approximations_report(command: str) -> str:
    """What the opt-in approximations cost in quality, on the bundled (trained) model.

    Random weights make a poor judge of image quality, so this uses the model we trained: deep
    cache against exact sampling for the same seeds, and VAE tiling against the whole-image decode
    of the same latents.
    """
    import numpy as np
    import torch

    from pipelines import TextToImage

    from .cli import BUNDLED_MODEL

    prompts = ["a yellow triangle in the centre, green background", "a red circle on the left",
               "a blue square at the top and a green circle at the bottom"]
    steps = 30
    exact = TextToImage.from_folder(BUNDLED_MODEL)
    reference = exact(prompts, num_inference_steps=steps, guidance_scale=5.0, seed=0,
                      progress=False).pixels
    lines = ["### Approximations: quality cost (bundled model)", "", f"Command: `{command}`", "",
             f"Deep cache: {len(prompts)} prompts, seed 0, {steps} DDIM steps, guidance 5, fp32; "
             "PSNR against exact sampling with the same seed.", "",
             "| deep_cache | deep UNet passes | PSNR dB (min / mean over images) |", "|---|---|---|"]
    for interval in (2, 3, 5):
        pipe = TextToImage.from_folder(BUNDLED_MODEL, deep_cache=interval)
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, seed=0,
                   progress=False).pixels
        scores = [psnr(o, r) for o, r in zip(out, reference)]
        deep_passes = -(-steps // interval)
        lines.append(f"| {interval} | {deep_passes} of {steps} | {min(scores):.1f} / "
                     f"{sum(scores) / len(scores):.1f} |")

    # Tiling is judged on what this VAE was trained on: shapes-world scenes, drawn at 4x its
    # native size so that the decode needs 4x4 tiles (a photograph is out of its distribution).
    from train.shapes import render, sample_scene

    size, scenes = 4 * vae_native(exact), 4
    rng = np.random.default_rng(0)
    images = [render(sample_scene(rng, split="train"), size, rng=rng) for _ in range(scenes)]
    x = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images])
    x = x.float() / 127.5 - 1
    vae = exact.components.vae
    with torch.inference_mode():
        z = vae.encode(x).latent_dist.mode()
        whole = vae.decode(z).sample
        vae.enable_tiling()
        tiled = vae.decode(z).sample
        vae.disable_tiling()

    def unit(t):
        return (t / 2 + 0.5).clamp(0, 1)

    lines += ["", f"VAE tiling: {scenes} shapes-world scenes rendered at {size}x{size}, encoded "
              f"once; the VAE's native size is {vae.config.sample_size} px, so the decode runs "
              f"in {vae.tile_sample_min_size}-px tiles blended over "
              f"{vae.tile_overlap_factor:.0%} overlaps.", "",
              "| comparison | PSNR dB |", "|---|---|",
              f"| tiled vs whole-image decode | {psnr(unit(tiled), unit(whole)):.1f} |",
              f"| whole-image decode vs original | {psnr(unit(whole), unit(x)):.1f} |",
              f"| tiled decode vs original | {psnr(unit(tiled), unit(x)):.1f} |", "",
              "Tiles decode without the rest of the image, and this VAE's mid-block attention "
              "uses the whole latent: an object cut by a tile border can come out in another "
              "colour, which is where nearly all of the error sits.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the tables into this markdown file")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--size", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--model", type=Path, default=BENCH_DIR / "sd15-random")
    parser.add_argument("--worker", choices=list(ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--sections", nargs="+", choices=("txt2img", "approximations"),
                        default=["txt2img", "approximations"],
                        help="txt2img: the speed matrix (about 2 h on 2 cores); approximations: "
                             "the quality cost of deep cache and VAE tiling (a minute)")
    args = parser.parse_args(argv)
    BENCH_DIR.mkdir(exist_ok=True)
    if args.worker:
        print(json.dumps(worker(ENGINES[args.worker], args.model, args.steps[0], args.size[0],
                                args.runs)))
        return 0
    given = sys.argv[1:] if argv is None else argv
    command = ("make bench" if given == ["--out", "BENCHMARKS.md"]
               else " ".join([".venv/bin/python -m ldm_engine.apps.bench", *given]))
    if "approximations" in args.sections:
        text = approximations_report(command)
        print(text, flush=True)
        if args.out:
            write_section(Path(args.out), "approximations", text)
    if "txt2img" not in args.sections:
        return 0
    ensure_model(args.model)
    import torch

    peaks = {"fp32": matmul_peak("float32"), "bf16": matmul_peak("bfloat16")}
    for size in args.size:
        flops = unet_flops(args.model, size, size)
        sections = [
            f"### txt2img {size}x{size}, SD-1.5 architecture (random weights), DDIM, "
            "guidance 7.5, CPU",
            "",
            f"Command: `{command}`  ",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads. Median of {args.runs} "
            "runs after one first call, each engine in its own process. Matmul peak (2048^3, best "
            f"of 10): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} "
            "GFLOP/s. 'UNet step' is the guided UNet call alone (batch 2) as each engine runs it; "
            "'x matmul floor' divides it by FLOPs / peak for the engine's dtype. PSNR is against "
            "diffusers' fp32 image for the same seed.",
            "",
        ]
        for steps in args.steps:
            results, cold_first = [], None
            for name in args.engines:
                engine = ENGINES[name]
                if engine.compile and not engine.deep_cache > 1 and steps == args.steps[0]:
                    cold = run_worker(replace(engine, cold=True), args.model, steps, size, 1)
                    cold_first = cold["first_s"]
                results.append(run_worker(engine, args.model, steps, size, args.runs))
            sections.append(report(results, flops, peaks, steps, size, args.runs, cold_first))
        text = "\n".join(sections)
        print(text, flush=True)
        if args.out:
            write_section(Path(args.out), f"txt2img-cpu-{size}", text)
    return 0


def write_section(path: Path, key: str, text: str) -> None:
    """Replace (or append) the block between markers, so other benchmark sections are kept."""
    from ldm_engine.fsutil import write_bytes_atomic

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
