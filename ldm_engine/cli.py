"""The ``ldm`` command: generate images, inspect and convert models.

Bad input ends with one line on stderr and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

from .errors import UserInputError

# As ldm_engine.precision.DTYPE_CHOICES, spelled out so `ldm --help` need not import torch.
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")

# The model trained by this project and shipped inside the package (see `make train-default`).
BUNDLED_MODEL = Path(__file__).parent / "models" / "default"


def _default_model() -> Path:
    if not BUNDLED_MODEL.is_dir():
        raise UserInputError(f"no --model given and no bundled model at {BUNDLED_MODEL}")
    return BUNDLED_MODEL


def cmd_generate(args: argparse.Namespace) -> int:
    from pipelines import GenerationParams, TextToImage, read_png_params
    from pipelines.params import check_request

    from .components import vae_factor_of

    if args.from_image:
        base = read_png_params(args.from_image)
        if args.prompt is not None:
            base = base.replace(prompt=args.prompt)
    elif args.prompt is None:
        raise UserInputError("give a PROMPT (or --from-image PNG to re-make an image)")
    overrides = {k: v for k, v in (("negative_prompt", args.negative), ("steps", args.steps),
                                   ("guidance_scale", args.guidance), ("seed", args.seed),
                                   ("sampler", args.sampler), ("eta", args.eta),
                                   ("height", args.height), ("width", args.width)) if v is not None}
    model = Path(args.model) if args.model else _default_model()
    # Bad arguments are reported before the (possibly multi-GB) weights are read.
    factor = vae_factor_of(model)
    if args.from_image:
        request = base.replace(**overrides)
        request.validate(factor)
    else:
        request = GenerationParams(prompt=args.prompt, **({"steps": 30} | overrides))
        check_request(steps=request.steps, guidance_scale=request.guidance_scale,
                      sampler=request.sampler, eta=request.eta, height=args.height or factor,
                      width=args.width or factor, vae_factor=factor)
    if args.num_images < 1:
        raise UserInputError(f"--num-images must be at least 1, got {args.num_images}")
    pipe = TextToImage.from_folder(model, device=args.device, dtype=args.dtype,
                                   compile=args.compile, deep_cache=args.deep_cache,
                                   vae_tiling=args.vae_tiling, attention=args.attention)
    if args.from_image:
        result = pipe.regenerate(request, progress=not args.quiet)
    else:
        result = pipe(request.prompt, negative_prompt=request.negative_prompt,
                      num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                      sampler=request.sampler, eta=request.eta, height=args.height,
                      width=args.width, num_images_per_prompt=args.num_images, seed=args.seed,
                      progress=not args.quiet)
    for path in result.save(args.out):
        print(path)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import format_report, inspect_path

    with _warnings_to_stderr("inspect"):
        print(format_report(inspect_path(args.path, trust_pickle=args.trust_pickle)))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    with _warnings_to_stderr("convert"):
        report = convert(args.src, args.dst, to=args.to, dtype=args.dtype, ema=args.ema,
                         family=args.family, prediction=args.prediction,
                         trust_pickle=args.trust_pickle, overwrite=args.overwrite)
    for note in report.notes:
        print(f"ldm convert: note: {note}", file=sys.stderr)
    print(f"{report.dest}: {report.dest_kind} from {report.source_kind} {report.source}, "
          f"family {report.family}, {report.prediction_type} prediction")
    return 0


@contextlib.contextmanager
def _warnings_to_stderr(command: str):
    """--trust-pickle's warning as an `ldm CMD: warning:` line, the moment it is raised."""
    from .convert.ckpt import UnsafeLoadWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", UnsafeLoadWarning)
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, UnsafeLoadWarning):
                print(f"ldm {command}: warning: {message}", file=sys.stderr, flush=True)
            else:
                default(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def cmd_eval(args: argparse.Namespace) -> int:
    from train.evaluate import EvalSettings, format_results, run_eval

    model = Path(args.model) if args.model else _default_model()
    if args.steps < 1 or not args.seeds:
        raise UserInputError("--steps must be >= 1 and --seeds must name at least one seed")
    settings = EvalSettings(seeds=tuple(args.seeds), steps=args.steps,
                            guidances=(1.0, args.guidance))
    print(format_results(run_eval(model, settings, grid=args.grid)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt", nargs="?", help="what to draw")
    g.add_argument("--model", help="diffusers-layout model folder (default: the bundled model)")
    g.add_argument("--out", default="image.png",
                   help="PNG to write; with several images name-0.png, name-1.png, ...")
    g.add_argument("--negative", help="negative prompt")
    g.add_argument("--steps", type=int, help="denoising steps (default 30)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7.5)")
    g.add_argument("--seed", type=int, help="seed; image k of a run uses seed + k (default random)")
    g.add_argument("--sampler", help="ddim or ddpm (default ddim)")
    g.add_argument("--eta", type=float, help="DDIM eta: 0 deterministic, 1 DDPM-like (default 0)")
    g.add_argument("--height", type=int, help="multiple of 8 (default: the model's native size)")
    g.add_argument("--width", type=int, help="multiple of 8 (default: the model's native size)")
    g.add_argument("--num-images", type=int, default=1, help="images for the prompt (default 1)")
    g.add_argument("--from-image", help="re-make a PNG from its embedded parameters")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights' precision; auto: bf16 on CPUs with native bf16, fp16 on CUDA, "
                        "else fp32 (default auto)")
    g.add_argument("--compile", action="store_true",
                   help="AOT-compile the UNet and VAE decoder with frozen weights (one-time "
                        "cost per model and size, cached in ~/.cache/ldm-engine)")
    g.add_argument("--attention", default="sdpa", choices=("sdpa", "xformers"),
                   help="attention kernels: torch SDPA (default) or xformers (CUDA only)")
    g.add_argument("--deep-cache", type=int, default=1, metavar="N",
                   help="APPROXIMATE: run the deep UNet blocks every N-th step only (default 1 = "
                        "off; 3 is the usual choice)")
    g.add_argument("--vae-tiling", action="store_true",
                   help="APPROXIMATE: decode in overlapping tiles to bound memory on large images")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="describe a model folder or single file without loading it")
    i.add_argument("path", help="diffusers folder, .safetensors or .ckpt file")
    i.add_argument("--trust-pickle", action="store_true",
                   help="unpickle a .ckpt fully, running any code in it (only for trusted files)")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser(
        "convert", help="convert between diffusers folders and single files",
        description="Convert an SD-1.x/2.x model between a diffusers folder and a single "
                    ".safetensors/.ckpt file (either direction, or file to file). Writes are "
                    "atomic and read back bit for bit before DST is replaced.")
    c.add_argument("src", help="diffusers folder, .safetensors or .ckpt file")
    c.add_argument("dst", help="output: a name ending in .safetensors or .ckpt is a single file, "
                               "anything else a diffusers folder")
    c.add_argument("--to", choices=("diffusers", "single-file"),
                   help="output kind (default: from DST's name)")
    c.add_argument("--dtype", choices=("fp32", "fp16", "bf16"),
                   help="cast floating-point weights (default: keep the source's dtypes)")
    ema = c.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=False,
                     help="convert the UNet's EMA weights (model_ema.*) instead of the live ones")
    ema.add_argument("--no-ema", dest="ema", action="store_false",
                     help="convert the live weights (the default)")
    c.add_argument("--family", metavar="{sd1,sd2}",
                   help="force the model family instead of detecting it (for a folder: which "
                        "single-file text-encoder layout to write, CLIP or OpenCLIP)")
    c.add_argument("--prediction", choices=("eps", "v"),
                   help="the model's prediction type (default: recorded in the file, else eps for "
                        "SD-1 and v for SD-2, whose 768-v and 2.1 models predict v; SD-2 "
                        "512-base is eps)")
    c.add_argument("--trust-pickle", action="store_true",
                   help="unpickle a .ckpt fully, running any code it contains: only for files "
                        "from a source you trust (default: safe loading, which refuses them)")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser("eval", help="held-out shapes-world accuracy of a model (pixel oracle)")
    e.add_argument("--model", help="model folder (default: the bundled model)")
    e.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    e.add_argument("--guidance", type=float, default=5.0,
                   help="guidance scale compared against no guidance (default 5)")
    e.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds per prompt")
    e.add_argument("--grid", help="also save a grid of one image per prompt to this PNG")
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserInputError, OSError) as e:
        print(f"ldm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
