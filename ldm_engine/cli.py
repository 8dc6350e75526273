"""The ``ldm`` command: generate images, inspect models.

Bad input ends with one line on stderr and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserInputError

# The model trained by this project and shipped inside the package (see `make train-default`).
BUNDLED_MODEL = Path(__file__).parent / "models" / "default"


def _default_model() -> Path:
    if not BUNDLED_MODEL.is_dir():
        raise UserInputError(f"no --model given and no bundled model at {BUNDLED_MODEL}")
    return BUNDLED_MODEL


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

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
    pipe = TextToImage.from_folder(model, dtype=torch.float32)
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
    from .inspection import format_report, inspect_folder

    print(format_report(inspect_folder(args.path)))
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
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="describe a model folder without loading it")
    i.add_argument("path")
    i.set_defaults(func=cmd_inspect)
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
