"""The ``ldm`` command: generate images, inspect and convert models.

Bad input ends with one line on stderr and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserInputError
from .limits import MAX_AREA_FACTOR, MAX_IMAGES, MAX_SIDE_FACTOR   # (no torch: keeps --help fast)

if TYPE_CHECKING:
    from pipelines import GenerationParams

    from .config_check import ModelShape

# As ldm_engine.precision.DTYPE_CHOICES, spelled out so `ldm --help` need not import torch.
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")

# The model trained by this project and shipped inside the package (see `make train-default`).
BUNDLED_MODEL = Path(__file__).parent / "models" / "default"


def _default_model() -> Path:
    if not BUNDLED_MODEL.is_dir():
        raise UserInputError(f"no --model given and no bundled model at {BUNDLED_MODEL}")
    return BUNDLED_MODEL


def cmd_generate(args: argparse.Namespace) -> int:
    from pipelines import GenerationParams, InexactRemakeWarning, TextToImage, read_png_params
    from pipelines.sampler_names import resolve_sampler

    from .components import model_shape_of, vae_factor_of

    if args.from_image:
        with _warnings_to_stderr("generate", InexactRemakeWarning):
            base = read_png_params(args.from_image)
        if args.prompt is not None:
            base = base.replace(prompt=args.prompt)
        if args.sampler is None:        # a sampler the PNG names but this engine lacks: say so
            base = base.replace(sampler=resolve_sampler(base.sampler))
    elif args.prompt is None:
        raise UserInputError("give a PROMPT (or --from-image PNG to re-make an image)")
    if args.sampler is not None:        # registry or A1111 display name -> registry name
        args.sampler = resolve_sampler(args.sampler)
    overrides = {k: v for k, v in (("negative_prompt", args.negative), ("steps", args.steps),
                                   ("guidance_scale", args.guidance), ("seed", args.seed),
                                   ("sampler", args.sampler), ("eta", args.eta),
                                   ("height", args.height), ("width", args.width),
                                   ("clip_skip", args.clip_skip)) if v is not None}
    model = Path(args.model) if args.model else _default_model()
    # Bad arguments are reported before the (possibly multi-GB) weights are read. A folder's
    # configs give the size limits now; a single file's are known once it is converted, and the
    # pipeline checks the request against them again before any compute.
    shape = model_shape_of(model)
    factor = shape.vae_factor if shape is not None else vae_factor_of(model)
    if args.from_image:
        request = base.replace(**overrides)
        request.validate(factor)
    else:
        # Without --height/--width the model's native size (factor: a stand-in until it is known).
        native = shape.native_side if shape is not None else factor
        request = GenerationParams(prompt=args.prompt, **({"steps": 30, "height": native,
                                                           "width": native} | overrides))
        if args.eta is None:            # the sampler's own eta (1 for euler_a and the SDEs)
            from pipelines.txt2img import default_eta
            request = request.replace(eta=default_eta(request.sampler))
    if args.num_images < 1:
        raise UserInputError(f"--num-images must be at least 1, got {args.num_images}")
    num_images = 1 if args.from_image else args.num_images
    _check_request_early(request, model, shape, factor, num_images=num_images,
                         seeded=bool(args.from_image) or args.seed is not None,
                         allow_large=args.no_size_limit, out=args.out)
    # The load-time choices that change pixels: as given, else a re-made image's own (so it
    # comes out the same), else the defaults.
    given = {"dtype": args.dtype, "deep_cache": args.deep_cache, "vae_tiling": args.vae_tiling}
    fallback = ({k: getattr(base, k) for k in given} if args.from_image else
                {"dtype": "auto", "deep_cache": 1, "vae_tiling": False})
    pixel_settings = {k: fallback[k] if v is None else v for k, v in given.items()}
    embeddings = _embeddings(args.embedding or [], model)   # read and checked before the model
    pipe = TextToImage.from_folder(model, device=args.device, compile=args.compile,
                                   attention=args.attention, **pixel_settings)
    if embeddings:
        pipe = pipe.with_embeddings(*embeddings)
    if args.from_image:
        # What the command line changed is wanted; only a different model is worth a warning.
        with _warnings_to_stderr("generate", InexactRemakeWarning):
            result = pipe.regenerate(request.replace(**pipe.pixel_settings()),
                                     progress=not args.quiet, allow_large=args.no_size_limit)
    else:
        result = pipe(request.prompt, negative_prompt=request.negative_prompt,
                      num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                      sampler=request.sampler, eta=request.eta, height=args.height,
                      width=args.width, num_images_per_prompt=args.num_images, seed=args.seed,
                      progress=not args.quiet, allow_large=args.no_size_limit,
                      clip_skip=request.clip_skip)
    for path in result.save(args.out):
        print(path)
    return 0


def _check_request_early(request: GenerationParams, model: Path, shape: ModelShape | None,
                         factor: int, *, num_images: int, seeded: bool, allow_large: bool,
                         out: str) -> None:
    """Everything about a request that can be wrong, checked before the weights are read."""
    from pipelines.base import as_prompt_list, output_paths
    from pipelines.params import check_request
    from pipelines.pnginfo import check_storable
    from schedulers import load_schedule_config

    # check_model_folder (via model_shape_of) has validated the scheduler config already.
    schedule = load_schedule_config(model / "scheduler") if shape is not None else None
    check_request(steps=request.steps, guidance_scale=request.guidance_scale,
                  sampler=request.sampler, eta=request.eta, height=request.height,
                  width=request.width, vae_factor=factor,
                  seed=request.seed if seeded else None, num_images=num_images,
                  schedule=schedule, shape=shape, allow_large=allow_large,
                  clip_skip=request.clip_skip, text_layers=_text_layers(model))
    # The prompt syntax (a weight that is no number) before the weights are read.
    from pipelines.prompts import parse_attention
    parse_attention(request.prompt)
    parse_attention(request.negative_prompt)
    check_storable(as_prompt_list(request.prompt))
    check_storable(as_prompt_list(request.negative_prompt, "negative prompt"), "negative prompt")
    check_writable(output_paths(out, num_images))


def _embeddings(paths: list[str], model: Path) -> list:
    """Textual-inversion embeddings from files and folders (every .pt/.bin/.safetensors in it),
    checked against a folder's text-encoder width."""
    from pipelines.embeddings import load_embedding

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir()
                            if f.suffix.lower() in (".pt", ".bin", ".safetensors"))
        else:
            files.append(p)
    dim = _text_config(model, "hidden_size")
    return [load_embedding(f, dim=dim) for f in files]


def _text_layers(model: Path) -> int | None:
    """A folder's text-encoder layer count (the largest --clip-skip), None when not known yet."""
    return _text_config(model, "num_hidden_layers")


def _text_config(model: Path, key: str) -> int | None:
    """An integer of a folder's text-encoder config; None for a single file (known once it is
    converted: the pipeline checks again) or a folder check_model_folder reports."""
    import json
    try:
        return int(json.loads((model / "text_encoder" / "config.json").read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_writable(paths: list[Path]) -> None:
    """Refuse destinations a PNG cannot be written to, before the generation they would lose.

    Each is written as a temporary beside it and renamed over it (fsutil.atomic_path), so what
    matters is the folder: it must exist and accept a new file, which is tried (with the same
    temporary naming, removed at once) because permission bits alone do not say so (root, ACLs,
    read-only mounts, /proc).
    """
    from .fsutil import temp_path

    probed: set[Path] = set()
    for path in paths:
        folder = path.parent
        if not folder.is_dir():
            raise UserInputError(f"--out {path}: folder {folder} does not exist")
        try:
            name_max = os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            name_max = 255
        if len(os.fsencode(path.name)) > name_max:
            raise UserInputError(f"--out {path}: the file name is longer than {name_max} bytes")
        if path.is_dir():
            raise UserInputError(f"--out {path} is a folder; give a file name such as "
                                 f"{path / 'image.png'}")
        if folder in probed:
            continue
        probe = temp_path(path)
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as e:
            raise UserInputError(f"--out {path}: cannot write into {folder} "
                                 f"({e.strerror or e})") from None
        probed.add(folder)


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


def one_line(text: object) -> str:
    """A message as one printable line: its lines joined by spaces, and characters stderr could
    not encode (lone surrogates from undecodable argv bytes) as escapes."""
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line.encode("utf-8", "backslashreplace").decode("utf-8")


@contextlib.contextmanager
def _warnings_to_stderr(command: str, *categories: type[Warning]):
    """Every Python warning as one `ldm CMD: warning: ...` line, with no source line.

    --trust-pickle's warning and `categories` are shown every time they are raised; others
    follow Python's filters (once per place). main() wraps every command in this; a command may
    nest it to make more categories show every time.
    """
    from .convert.ckpt import UnsafeLoadWarning

    with warnings.catch_warnings():
        for category in (UnsafeLoadWarning, *categories):
            warnings.simplefilter("always", category)

        def show(message, category, filename, lineno, file=None, line=None):
            print(f"ldm {command}: warning: {one_line(message)}", file=sys.stderr, flush=True)

        warnings.showwarning = show
        yield


class _OneLineLogHandler(logging.Handler):
    def __init__(self, command: str):
        super().__init__(logging.WARNING)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno < logging.ERROR else "error"
        try:
            message = one_line(record.getMessage())
        except Exception:                       # a bad %-format in some library's call
            message = one_line(record.msg)
        print(f"ldm {self.command}: {level}: {message}", file=sys.stderr, flush=True)


# Libraries that print their log records through their own stderr handler rather than the root
# logger's (transformers, diffusers: multi-line messages, no `ldm CMD:` prefix).
_LIBRARY_LOGGERS = ("transformers", "diffusers")


@contextlib.contextmanager
def _logs_to_stderr(command: str):
    """Logged warnings (ours, transformers', diffusers') as one `ldm CMD: warning:` line each."""
    # Every command imports these anyway; components first, as it makes sure no hub is
    # contacted (HF_HUB_OFFLINE) before huggingface_hub reads its settings.
    import diffusers
    import transformers

    from . import components  # noqa: F401

    # Both libraries give their root logger its own handler (and stop propagation) lazily, on
    # first use; doing it now means that first use cannot happen inside this block, replacing
    # our redirection, nor be undone by the restore below.
    transformers.utils.logging.get_verbosity()
    diffusers.utils.logging.get_verbosity()
    handler = _OneLineLogHandler(command)
    root = logging.getLogger()
    saved = {}
    for name in _LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        saved[name] = (lib.handlers[:], lib.propagate)
        lib.handlers[:] = []
        lib.propagate = True
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for name, (handlers, propagate) in saved.items():
            lib = logging.getLogger(name)
            lib.handlers[:] = handlers
            lib.propagate = propagate


def cmd_eval(args: argparse.Namespace) -> int:
    from train.evaluate import EvalSettings, format_results, run_eval

    model = Path(args.model) if args.model else _default_model()
    if args.steps < 1 or not args.seeds:
        raise UserInputError("--steps must be >= 1 and --seeds must name at least one seed")
    from pipelines.params import check_steps
    from pipelines.sampler_names import resolve_sampler
    from schedulers import get_sampler, load_schedule_config, train_schedule

    sampler = resolve_sampler(args.sampler)
    schedule = load_schedule_config(model / "scheduler")
    check_steps(args.steps, sampler, schedule)
    chosen = get_sampler(sampler)
    # What a quality-per-cost comparison needs: UNet evaluations, not steps (Heun calls twice).
    calls = chosen.total_model_calls(chosen.make_plan(train_schedule(schedule), args.steps))
    settings = EvalSettings(seeds=tuple(args.seeds), steps=args.steps, sampler=sampler,
                            guidances=(args.guidance,) if args.guided_only else
                            (1.0, args.guidance))
    print(f"sampler {sampler}, {args.steps} steps, {calls} UNet evaluations per image "
          "(a guided evaluation batches the conditional and unconditional halves: one)")
    print(format_results(run_eval(model, settings, grid=args.grid)))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error instead of the whole usage block (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ldm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt", nargs="?", help="what to draw")
    g.add_argument("--model", help="diffusers-layout model folder, or an SD-1.x/2.x .safetensors "
                                   "or .ckpt single file, used without writing anything (default: "
                                   "the bundled model)")
    g.add_argument("--out", default="image.png",
                   help="PNG to write; with several images name-0.png, name-1.png, ...")
    g.add_argument("--negative", help="negative prompt")
    g.add_argument("--steps", type=int, help="denoising steps (default 30)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7.5)")
    g.add_argument("--seed", type=int, help="seed; image k of a run uses seed + k (default random)")
    g.add_argument("--sampler", help="a registry name (euler_a, dpmpp_2m_karras, ...), its "
                                     "AUTOMATIC1111 name (\"Euler a\", \"DPM++ 2M Karras\", any "
                                     "case) or diffusers:<SchedulerClass> (default ddim; an "
                                     "unknown name lists them all)")
    g.add_argument("--eta", type=float, help="noise scale: DDIM's eta (0 deterministic, 1 "
                                         "DDPM-like) or the ancestral/SDE samplers' (default: "
                                         "1 for euler_a, dpm2_a, dpmpp_2s_a, dpmpp_sde, "
                                         "dpmpp_2m_sde; else 0)")
    g.add_argument("--embedding", action="append", metavar="FILE_OR_DIR",
                   help="textual-inversion embedding (A1111 .pt/.safetensors, diffusers "
                        "learned_embeds): the word named after the file stands for it in "
                        "prompts; a folder gives all of its files; repeatable")
    g.add_argument("--clip-skip", type=int, metavar="N",
                   help="condition on the N-th text-encoder layer from the end, AUTOMATIC1111's "
                        "numbering: 1 = the last (default), 2 = the penultimate (diffusers' "
                        "clip_skip=1); with --from-image the PNG's")
    for side in ("height", "width"):
        g.add_argument(f"--{side}", type=int,
                       help="pixels, a multiple of the model's VAE factor: 8 for SD, 4 for the "
                            "bundled model (default: the model's native size)")
    g.add_argument("--num-images", type=int, default=1,
                   help=f"images for the prompt (default 1, at most {MAX_IMAGES})")
    g.add_argument("--no-size-limit", action="store_true",
                   help=f"allow sides over {MAX_SIDE_FACTOR}x and areas over {MAX_AREA_FACTOR}x "
                        f"the model's native size and more than {MAX_IMAGES} images, and check "
                        "the memory estimate against total rather than free memory")
    g.add_argument("--from-image", metavar="PNG",
                   help="re-make a PNG from its A1111 parameters (with its dtype, deep cache and "
                        "tiling); other options given override the PNG's")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    g.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help="weights' precision; auto: bf16 on CPUs with native bf16, fp16 on CUDA, "
                        "else fp32 (default auto; with --from-image the PNG's, fp32 if it names "
                        "none)")
    g.add_argument("--compile", action="store_true",
                   help="AOT-compile the UNet with frozen weights (one-time cost per model and "
                        "size, cached in ~/.cache/ldm-engine); the VAE stays eager")
    g.add_argument("--attention", default="sdpa", choices=("sdpa", "xformers"),
                   help="attention kernels: torch SDPA (default) or xformers (CUDA only)")
    g.add_argument("--deep-cache", type=int, metavar="N",
                   help="APPROXIMATE: run the deep UNet blocks every N-th step only (default 1 = "
                        "off, or with --from-image the PNG's; 3 is the usual choice)")
    g.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction,
                   help="APPROXIMATE: decode in overlapping tiles to bound memory on large images "
                        "(default off, or with --from-image the PNG's)")
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
    e.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    e.add_argument("--sampler", default="ddim",
                   help="registry or AUTOMATIC1111 name, as for generate (default ddim)")
    e.add_argument("--guided-only", action="store_true",
                   help="skip the unguided pass (half the time; for sampler comparisons)")
    e.add_argument("--guidance", type=float, default=5.0,
                   help="guidance scale compared against no guidance (default 5)")
    e.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds per prompt")
    e.add_argument("--grid", help="also save a grid of one image per prompt to this PNG")
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:         # --help (0), or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else 2
    try:
        with _warnings_to_stderr(args.command), _logs_to_stderr(args.command):
            return args.func(args)
    except (UserInputError, OSError) as e:
        print(f"ldm {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
