"""The ``ldm`` command: make images in every mode, inspect and convert models.

Bad input ends with one line on stderr and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import re
import sys
import textwrap
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ldm_engine.apps.cli_clip import (RERANK_COMMANDS, add_clip_parsers, add_rerank_options,
                                      load_clip_arg, report_rerank, rerank_files)
from ldm_engine.errors import UserInputError
from ldm_engine.limits import MAX_AREA_FACTOR, MAX_IMAGES, MAX_SIDE_FACTOR   # (no torch: keeps --help fast)
# The model trained by this project and shipped inside the package (see `make train-default`).
from ldm_engine.paths import BUNDLED_MODEL

if TYPE_CHECKING:
    from pipelines import GenerationParams

    from ldm_engine.config_check import ModelShape

# As ldm_engine.precision.DTYPE_CHOICES, spelled out so `ldm --help` need not import torch.
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def _default_model() -> Path:
    if not BUNDLED_MODEL.is_dir():
        raise UserInputError(f"no --model given and no bundled model at {BUNDLED_MODEL}")
    return BUNDLED_MODEL


# --- the image-making commands -------------------------------------------------------------
#
# Each command is the CLI of one mode's request type (pipelines.params): its options are that
# type's fields, an option left out leaves the field out (so its default is the type's, the
# only defaults there are), and the request is checked whole before the weights are read. Any
# loaded pipeline runs any mode's request (pipelines.registry), so every command loads
# TextToImage and calls pipe.run(request).

# The registry name of each command's mode; `generate` is text to image.
MODES = {"generate": "txt2img", "img2img": "img2img", "inpaint": "inpaint",
         "outpaint": "outpaint", "vary": "vary", "interpolate": "interpolate", "edit": "edit"}
COMMAND_OF = {mode: command for command, mode in MODES.items()}
# Each command's request type in pipelines.params.
REQUEST_TYPES = {"generate": "GenerationParams", "img2img": "ImageToImageParams",
                 "inpaint": "InpaintParams", "outpaint": "OutpaintParams",
                 "vary": "VariationParams", "interpolate": "InterpolationParams",
                 "edit": "EditParams"}
# Options every command has that are request fields (the argparse dest is the field's name).
COMMON_FIELDS = ("negative_prompt", "steps", "guidance_scale", "seed", "sampler", "eta",
                 "height", "width", "clip_skip")
# Each command's own fields, beyond those.
# (rerank: the modes of cli_clip.RERANK_COMMANDS, whose --rerank options that module adds.)
MODE_FIELDS = {
    "generate": ("rerank",),
    "img2img": ("strength", "resize_mode", "init_latents", "rerank"),
    "inpaint": ("strength", "resize_mode", "init_latents", "mask_blur", "only_masked",
                "padding", "overlay", "rerank"),
    "outpaint": ("strength", "mask_blur", "left", "right", "top", "bottom", "fill", "color",
                 "overlap", "overlay", "rerank"),
    "vary": ("strength", "resize_mode", "rerank"),
    "interpolate": ("end_prompt", "end_seed", "frames"),
    "edit": ("target_prompt", "amounts", "strength", "resize_mode"),
}
# The image files a command reads: (option dest, request field, what it is called in messages).
IMAGE_OPTIONS = {
    "img2img": (("image", "init_image", "init image"),),
    "inpaint": (("image", "init_image", "init image"), ("mask", "mask", "mask")),
    "outpaint": (("image", "init_image", "init image"),),
    "vary": (("image", "init_image", "init image"),),
    "interpolate": (("image", "init_image", "start image"), ("end_image", "end_image",
                                                             "end image")),
    "edit": (("image", "init_image", "init image"),),
}
# The sequence modes: one image per frame / amount, saved with a grid of them all.
SEQUENCES = ("interpolate", "edit")


def cmd_make(args: argparse.Namespace) -> int:
    """Every image-making command: build its mode's request, check it, load, run, save."""
    from pipelines import InexactRemakeWarning, TextToImage

    from ldm_engine.components import model_shape_of, vae_factor_of

    command = args.command
    with _warnings_to_stderr(command, InexactRemakeWarning):
        request = _request_of(args)
    model = Path(args.model) if args.model else _default_model()
    # Bad arguments are reported before the (possibly multi-GB) weights are read. A folder's
    # configs give the size limits now; a single file's are known once it is converted, and the
    # pipeline checks the request against them again before any compute.
    shape = model_shape_of(model)
    factor = shape.vae_factor if shape is not None else vae_factor_of(model)
    request.validate(factor)
    _check_images(request, factor)
    num_images = 1 if args.num_images is None else args.num_images
    if num_images < 1:
        raise UserInputError(f"--num-images must be at least 1, got {num_images}")
    if args.from_image:
        num_images = 1
    if command in SEQUENCES and num_images != 1:
        raise UserInputError(f"ldm {command} makes one image per "
                             f"{'frame' if command == 'interpolate' else 'amount'}; "
                             "--num-images is not for it")
    outputs = _output_files(args, request, num_images)
    # --rerank's CLIP and --save-candidates' files (none for the sequence commands).
    candidates = (rerank_files(args, request, model, outputs) if command in RERANK_COMMANDS
                  else [])
    # Without --height/--width the mode's own size (factor: a stand-in for a single file's
    # native size until it is known).
    native = shape.native_side if shape is not None else factor
    height, width = _generation_size(request, factor, native)
    _check_request_early(request.replace(height=height, width=width), model, shape, factor,
                         num_images=len(outputs), seeds=num_images,
                         allow_large=args.no_size_limit,
                         outputs=outputs + _extra_files(args, outputs) + candidates)
    # The load-time choices that change pixels: as given, else a re-made image's own (so it
    # comes out the same), else the defaults.
    given = {"dtype": args.dtype, "deep_cache": args.deep_cache, "vae_tiling": args.vae_tiling}
    fallback = ({k: getattr(request, k) for k in given} if args.from_image else
                {"dtype": "auto", "deep_cache": 1, "vae_tiling": False})
    pixel_settings = {k: fallback[k] if v is None else v for k, v in given.items()}
    embeddings = _embeddings(args.embedding or [], model)   # read and checked before the model
    clip = load_clip_arg(args) if getattr(args, "clip", None) else None     # so is --clip
    pipe = TextToImage.from_folder(model, device=args.device, compile=args.compile,
                                   attention=args.attention, **pixel_settings)
    if embeddings:
        pipe = pipe.with_embeddings(*embeddings)
    if clip is not None:
        pipe = pipe.with_clip(clip)
    with _warnings_to_stderr(command, InexactRemakeWarning):
        if args.from_image:
            # What the command line changed is wanted; only a different model is worth a
            # warning (regenerate names it).
            result = pipe.regenerate(request.replace(**pipe.pixel_settings()),
                                     progress=not args.quiet, allow_large=args.no_size_limit)
        else:
            result = pipe.run(request, num_images=num_images, progress=not args.quiet,
                              allow_large=args.no_size_limit)
    saved = result.save(args.out)
    for path in saved:
        print(path)
    report_rerank(args, result, saved)
    _save_extras(args, pipe, result)
    return 0


def _request_of(args: argparse.Namespace):
    """The command's request: its type built from the options given, or the --from-image PNG's
    request with the options given replacing its fields; image files loaded into it."""
    import random

    import pipelines.params as params
    from pipelines import read_png_params
    from pipelines.sampler_names import resolve_sampler

    command = args.command
    cls = getattr(params, REQUEST_TYPES[command])
    fields = {name: getattr(args, name) for name in COMMON_FIELDS + MODE_FIELDS[command]
              if getattr(args, name) is not None}
    if "sampler" in fields:             # registry or A1111 display name -> registry name
        fields["sampler"] = resolve_sampler(fields["sampler"])
    base = None
    if args.from_image:
        base = read_png_params(args.from_image)
        made_by = COMMAND_OF.get(base.mode, base.mode)
        if made_by != command:
            raise UserInputError(f"{args.from_image} was made by `ldm {made_by}` ({base.mode}); "
                                 f"re-make it with `ldm {made_by} --from-image "
                                 f"{args.from_image}`")
        if args.prompt is not None:
            fields["prompt"] = args.prompt
        if "sampler" not in fields:     # a sampler the PNG names but this engine lacks: say so
            fields["sampler"] = resolve_sampler(base.sampler)
    elif args.prompt is None:
        raise UserInputError("give a PROMPT (or --from-image PNG to re-make an image)")
    else:
        fields["prompt"] = args.prompt
        # A random seed is drawn here so the PNG records the one used.
        fields.setdefault("seed", random.SystemRandom().randrange(2**32))
    if command == "generate":
        hires = _hires_of(args, base.hires if base is not None else None)
        if hires is not None:
            fields["hires"] = hires
    fields |= _images_of(args, base)
    return base.replace(**fields) if base is not None else cls(**fields)


def _hires_of(args: argparse.Namespace, current):
    """generate's hires fix: the PNG's (current) or a new params.HiresFix, with the --hires-*
    options given replacing its fields; None when off."""
    import dataclasses

    from pipelines import HiresFix

    given = {k: getattr(args, f"hires_{k}") for k in ("scale", "steps", "upscaler", "strength")
             if getattr(args, f"hires_{k}") is not None}
    if current is None and not args.hires_fix:
        if given:
            raise UserInputError(f"--hires-{next(iter(given))} needs --hires-fix")
        return None
    return dataclasses.replace(current or HiresFix(), **given)


def _images_of(args: argparse.Namespace, base) -> dict:
    """The command's image files, read and checked (pipelines.images), as request fields.

    A PNG records only the hashes of the images it was made from (pipelines.params.image_hash),
    so a re-make needs the files again; a file whose hash differs is used, with an
    InexactRemakeWarning (the image will differ).
    """
    from pipelines import InexactRemakeWarning
    from pipelines.images import load_image, load_mask
    from pipelines.params import image_hash

    out = {}
    for dest, field, what in IMAGE_OPTIONS.get(args.command, ()):
        path = getattr(args, dest)
        recorded = getattr(base, f"{field}_hash", "") if base is not None else ""
        if path is None:
            if recorded:
                raise UserInputError(f"{args.from_image} was made from a {what} (hash "
                                     f"{recorded}); give it again with "
                                     f"--{dest.replace('_', '-')}")
            continue
        image = (load_mask(path, invert=args.invert_mask) if field == "mask" else
                 load_image(path, what))
        got = image_hash(image)
        if recorded and got != recorded:
            warnings.warn(InexactRemakeWarning(
                f"--{dest.replace('_', '-')} {path} is not the {what} {args.from_image} was made "
                f"from (hash {got}, the PNG records {recorded}): the image will differ"))
        out[field] = image
    return out


def _check_images(request, factor: int) -> None:
    """What the request types' own checks (validate) leave to the mode, which would see it only
    after the weights are read: a mask with nothing to repaint, an outpainted canvas off the
    VAE grid."""
    from pipelines.images import binarize, mask_to_tensor

    mask = getattr(request, "mask", None)
    if mask is not None and not binarize(mask_to_tensor(mask)).any():
        raise UserInputError("the mask has nothing to repaint: white (>= 128) = repaint, black "
                             "= keep (--invert-mask swaps them)")
    if request.mode == "outpaint" and request.init_image is not None:
        w, h = request.init_image.size
        for side, size, given, ends in (("width", w + request.left + request.right,
                                         request.width, "--left/--right"),
                                        ("height", h + request.top + request.bottom,
                                         request.height, "--top/--bottom")):
            if given is None and size % factor:
                raise UserInputError(
                    f"the outpainted canvas {side} {size} is not a multiple of {factor} (the "
                    f"VAE's factor); add {factor - size % factor} px with {ends}, or give "
                    f"--{side}")


def _generation_size(request, factor: int, native: int) -> tuple[int, int]:
    """The (height, width) the mode will generate at, for the early size checks: the request's,
    else its image's rounded down to the VAE factor (the outpainted canvas's), else native."""
    image = getattr(request, "init_image", None)
    if image is None:
        h = w = native
    else:
        w, h = image.size
        if request.mode == "outpaint":
            w, h = w + request.left + request.right, h + request.top + request.bottom
        if (request.height is None and h < factor) or (request.width is None and w < factor):
            raise UserInputError(f"the init image is {w}x{h}, smaller than the VAE factor "
                                 f"{factor}")
        h, w = h - h % factor, w - w % factor
    return (h if request.height is None else request.height,
            w if request.width is None else request.width)


def _output_files(args: argparse.Namespace, request, num_images: int) -> list[Path]:
    """The PNGs a run writes: one per image, frame or amount (GenerationResult.save's names)."""
    from pipelines.base import output_paths

    n = num_images
    if args.command == "interpolate" and getattr(request, "frame", None) is None:
        n = request.frames
    elif args.command == "edit" and getattr(request, "amount", None) is None:
        n = len(request.amounts)
    return output_paths(args.out, n)


def _grid_path(out: str) -> Path:
    path = Path(out)
    return path.with_name(f"{path.stem}-grid{path.suffix or '.png'}")


def _extra_files(args: argparse.Namespace, outputs: list[Path]) -> list[Path]:
    """The grid (and animation) a sequence command writes beside its PNGs, checked early."""
    from pipelines.images import ANIMATION_FORMATS

    extra = []
    if args.command in SEQUENCES and len(outputs) > 1:
        extra.append(_grid_path(args.out))
    gif = getattr(args, "gif", None)
    if gif is not None:
        if Path(gif).suffix.lower() not in ANIMATION_FORMATS:
            raise UserInputError(f"--gif {gif}: the name must end in "
                                 f"{' or '.join(ANIMATION_FORMATS)}")
        extra.append(Path(gif))
    return extra


def _save_extras(args: argparse.Namespace, pipe, result) -> None:
    """A sequence's grid PNG (plain: the frames carry the parameters) and animation; with
    vary --psnr, how well the inversion reconstructs the image."""
    from pipelines.images import image_grid, save_animation

    from ldm_engine.fsutil import atomic_path

    if args.command in SEQUENCES and len(result.images) > 1:
        grid = _grid_path(args.out)
        with atomic_path(grid) as tmp:
            # One row, in order, as pipelines.unclip.save_sequence lays a sequence out.
            image_grid(result.images, cols=len(result.images)).save(tmp, format="PNG")
        print(grid)
    if getattr(args, "gif", None) is not None:
        save_animation(result.images, args.gif)
        print(args.gif)
    if getattr(args, "psnr", False):
        from pipelines.inversion import invert

        r = result.params[0]
        inversion = invert(pipe, r.init_image, r.prompt, negative_prompt=r.negative_prompt,
                           steps=r.steps, guidance_scale=r.guidance_scale, strength=r.strength,
                           clip_skip=r.clip_skip, resize_mode=r.resize_mode, height=r.height,
                           width=r.width)
        print(f"inversion reconstruction PSNR: {inversion.reconstruction_psnr(pipe):.2f} dB "
              "(DDIM with eta 0 from the inverted latent, against the image's VAE round trip)")


def _check_request_early(request: GenerationParams, model: Path, shape: ModelShape | None,
                         factor: int, *, num_images: int, seeds: int, allow_large: bool,
                         outputs: list[Path]) -> None:
    """Everything about a request that can be wrong, checked before the weights are read.

    num_images is how many the run makes (the size limits), seeds how many seeds it uses
    (seed, seed + 1, ...: a sequence's frames share one).
    """
    from pipelines.modes import as_prompt_list
    from pipelines.params import check_request, check_seed
    from pipelines.pnginfo import check_storable
    from schedulers import load_schedule_config

    from ldm_engine.limits import check_size

    # check_model_folder (via model_shape_of) has validated the scheduler config already.
    schedule = load_schedule_config(model / "scheduler") if shape is not None else None
    check_request(steps=request.steps, guidance_scale=request.guidance_scale,
                  sampler=request.sampler, eta=0.0 if request.eta is None else request.eta,
                  height=request.height, width=request.width, vae_factor=factor,
                  num_images=num_images, schedule=schedule, shape=shape,
                  allow_large=allow_large, clip_skip=request.clip_skip,
                  text_layers=_text_layers(model))
    check_seed(request.seed, seeds)
    hires = getattr(request, "hires", None)
    if hires is not None and shape is not None:     # the second pass's size, too
        h, w = hires.size(request.height, request.width, factor)
        check_size(shape, height=h, width=w, num_images=num_images, allow_large=allow_large)
    # The prompt syntax (a weight that is no number) before the weights are read.
    from pipelines.prompts import parse_attention
    for text in (request.prompt, request.negative_prompt, getattr(request, "end_prompt", ""),
                 getattr(request, "target_prompt", "")):
        parse_attention(text)
        check_storable(as_prompt_list(text))
    check_storable(as_prompt_list(request.negative_prompt, "negative prompt"), "negative prompt")
    check_writable(outputs)


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
    from ldm_engine.fsutil import temp_path

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
    from ldm_engine.inspection import format_report, inspect_path

    with _warnings_to_stderr("inspect"):
        print(format_report(inspect_path(args.path, trust_pickle=args.trust_pickle)))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ldm_engine.convert import convert

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
    from ldm_engine.convert.ckpt import UnsafeLoadWarning

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
    # Every command imports these anyway (no hub is contacted: ldm_engine/__init__.py has set
    # HF_HUB_OFFLINE before huggingface_hub reads its settings).
    import diffusers
    import transformers

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
    if args.rerank < 1:
        raise UserInputError(f"--rerank must be >= 1, got {args.rerank}")
    settings = EvalSettings(seeds=tuple(args.seeds), steps=args.steps, sampler=sampler,
                            guidances=(args.guidance,) if args.guided_only else
                            (1.0, args.guidance), rerank=args.rerank)
    print(f"sampler {sampler}, {args.steps} steps, {calls} UNet evaluations per image "
          "(a guided evaluation batches the conditional and unconditional halves: one)")
    print(format_results(run_eval(model, settings, grid=args.grid)))
    return 0


# --- the commands' help: defaults read from the request types --------------------------------

@functools.cache
def request_source() -> tuple[dict[str, dict[str, object]], dict[str, tuple[str, ...]]]:
    """The request types' field defaults ({class: {field: default}}, inherited ones included)
    and the choices of each `Name = Literal[...]`, read from pipelines/params.py's source.

    The defaults live in those dataclasses only; the help shows them and the choices restrict
    the options without importing that module at parse time (it imports torch: seconds).
    tests/test_cli_modes.py checks that this reading equals the imported dataclasses.
    """
    import ast
    import importlib.util

    spec = importlib.util.find_spec("pipelines")        # finds the package without running it
    tree = ast.parse((Path(spec.submodule_search_locations[0]) / "params.py").read_text())
    classes: dict[str, dict[str, object]] = {}
    literals: dict[str, tuple[str, ...]] = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Subscript)
                and getattr(node.value.value, "id", None) == "Literal"):
            values = ast.literal_eval(node.value.slice)
            literals[node.targets[0].id] = values if isinstance(values, tuple) else (values,)
        elif isinstance(node, ast.ClassDef):
            fields: dict[str, object] = {}
            for base in node.bases:
                fields |= classes.get(getattr(base, "id", None), {})
            for item in node.body:
                if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                        and item.value is not None):
                    continue
                value = item.value
                if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
                    value = next((k.value for k in value.keywords if k.arg == "default"), None)
                try:
                    fields[item.target.id] = ast.literal_eval(value)
                except (ValueError, TypeError, SyntaxError):
                    fields.pop(item.target.id, None)    # not a literal: no default to show
            classes[node.name] = fields
    return classes, literals


def _add_init_latents(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init-latents", choices=_choices("InitLatents"),
                        help="the image's latent: a draw from the VAE posterior (seeded per "
                             "image, diffusers' default) or its mean (default {=init_latents})")


def _add_overlay(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overlay", action=argparse.BooleanOptionalAction,
                        help="paste the input's own pixels back outside the (blurred) mask "
                             "after decoding, as AUTOMATIC1111 does; off by default, as in "
                             "diffusers (the kept region is then the VAE's round trip)")


def _choices(literal: str) -> tuple[str, ...]:
    return request_source()[1][literal]


# What a None default means, by field, in the help.
_NONE_DEFAULTS = {"eta": "the sampler's own: 1 for euler_a, dpm2_a, dpmpp_2s_a, dpmpp_sde, "
                         "dpmpp_2m_sde, else 0",
                  "end_seed": "SEED + 1"}
_DEFAULT_MARK = re.compile(r"\{=(?:(\w+)\.)?(\w+)\}")


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(_shown(v) for v in value)
    return "none" if value == "" else str(value)


def _formatter(request: str) -> type[argparse.HelpFormatter]:
    """A help formatter for a command whose request type is `request`: `{=field}` in a help
    text shows that field's default, `{=Class.field}` another type's (params.HiresFix)."""

    class Help(argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action):
            text = super()._get_help_string(action)
            if not text or "{=" not in text:
                return text
            classes = request_source()[0]

            def default(m: re.Match) -> str:
                value = classes[m[1] or request][m[2]]
                return _NONE_DEFAULTS.get(m[2], "none") if value is None else _shown(value)

            return _DEFAULT_MARK.sub(default, text)

    return Help


def _add_common(parser: argparse.ArgumentParser, *, size: str) -> None:
    """The options every image-making command has (those that are request fields write into
    the field of the same name; an option not given leaves the request type's default)."""
    parser.set_defaults(func=cmd_make)
    # Shown after the command's own options.
    p = parser.add_argument_group("options of every image command")
    p.add_argument("--model", help="diffusers-layout model folder, or an SD-1.x/2.x .safetensors "
                                   "or .ckpt single file, used without writing anything (default: "
                                   "the bundled model)")
    p.add_argument("--out", default="image.png",
                   help="PNG to write; with several images name-0.png, name-1.png, ... "
                        "(default image.png)")
    p.add_argument("--negative", dest="negative_prompt", metavar="TEXT",
                   help="negative prompt: what to steer away from")
    p.add_argument("--steps", type=int, help="denoising steps (default {=steps})")
    p.add_argument("--guidance", dest="guidance_scale", type=float, metavar="SCALE",
                   help="classifier-free guidance scale (default {=guidance_scale})")
    p.add_argument("--seed", type=int,
                   help="seed; image k of a run uses seed + k (default random)")
    p.add_argument("--sampler", help="a registry name (euler_a, dpmpp_2m_karras, ...), its "
                                     "AUTOMATIC1111 name (\"Euler a\", \"DPM++ 2M Karras\", any "
                                     "case) or diffusers:<SchedulerClass> (default {=sampler}; "
                                     "an unknown name lists them all)")
    p.add_argument("--eta", type=float, help="noise scale: DDIM's eta (0 deterministic, 1 "
                                             "DDPM-like) or the ancestral/SDE samplers' "
                                             "(default: {=eta})")
    p.add_argument("--embedding", action="append", metavar="FILE_OR_DIR",
                   help="textual-inversion embedding (A1111 .pt/.safetensors, diffusers "
                        "learned_embeds): the word named after the file stands for it in "
                        "prompts; a folder gives all of its files; repeatable")
    p.add_argument("--clip-skip", type=int, metavar="N",
                   help="condition on the N-th text-encoder layer from the end, AUTOMATIC1111's "
                        "numbering: 1 = the last (default), 2 = the penultimate (diffusers' "
                        "clip_skip=1); with --from-image the PNG's")
    for side in ("height", "width"):
        p.add_argument(f"--{side}", type=int,
                       help=f"pixels, a multiple of the model's VAE factor: 8 for SD, 4 for the "
                            f"bundled model (default: {size})")
    p.add_argument("--num-images", type=int, metavar="N",
                   help=f"images for the prompt, seeds SEED, SEED + 1, ... (default 1, at most "
                        f"{MAX_IMAGES})")
    p.add_argument("--no-size-limit", action="store_true",
                   help=f"allow sides over {MAX_SIDE_FACTOR}x and areas over {MAX_AREA_FACTOR}x "
                        f"the model's native size and more than {MAX_IMAGES} images, and check "
                        "the memory estimate against total rather than free memory")
    p.add_argument("--from-image", metavar="PNG",
                   help="re-make a PNG this command wrote, from its A1111 parameters (with its "
                        "dtype, deep cache and tiling); options given override the PNG's. The "
                        "PNG holds only the hashes of its input images: give --image (--mask, "
                        "...) again")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help="weights' precision; auto: bf16 on CPUs with native bf16, fp16 on CUDA, "
                        "else fp32 (default auto; with --from-image the PNG's, fp32 if it names "
                        "none)")
    p.add_argument("--compile", action="store_true",
                   help="AOT-compile the UNet with frozen weights (one-time cost per model and "
                        "size, cached in ~/.cache/ldm-engine); the VAE stays eager")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "xformers"),
                   help="attention kernels: torch SDPA (default) or xformers (CUDA only)")
    p.add_argument("--deep-cache", type=int, metavar="N",
                   help="APPROXIMATE: run the deep UNet blocks every N-th step only (default 1 = "
                        "off, or with --from-image the PNG's; 3 is the usual choice)")
    p.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction,
                   help="APPROXIMATE: decode in overlapping tiles to bound memory on large images "
                        "(default off, or with --from-image the PNG's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_image(p: argparse.ArgumentParser, *, required: bool = True,
               help: str = "the image to start from (PNG, JPEG or WebP; transparency is "
                           "composited onto white)") -> None:
    p.add_argument("--image", required=required, metavar="FILE", help=help)


def _add_strength(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--strength", type=float,
                   help=f"denoising strength in (0, 1]: {what} (default {{=strength}})")


def _add_resize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resize-mode", choices=_choices("ResizeMode"),
                   help="how the image is fitted to --height/--width when they differ from its "
                        "size: stretch, scale to cover and centre-crop, or scale to fit and fill "
                        "(default {=resize_mode})")


def _number_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be numbers separated by commas, got "
                                         f"{text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"must be finite numbers, got {text!r}")
    return values


def _rgb(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) <= 255 for p in parts):
        raise argparse.ArgumentTypeError(f"must be R,G,B: three integers 0-255, got {text!r}")
    return tuple(int(p) for p in parts)


def _image_commands(sub) -> None:
    """generate, img2img, inpaint, outpaint, vary, interpolate, edit."""

    def command(name: str, help: str, description: str, examples: str, prompt: str):
        p = sub.add_parser(name, help=help, description=textwrap.fill(description, 79),
                           epilog="examples:\n" + examples,
                           formatter_class=_formatter(REQUEST_TYPES[name]))
        # A caption for the modes that invert an image under it (vary, edit).
        p.add_argument("prompt", nargs="?", help=prompt,
                       metavar="CAPTION" if prompt.startswith("a caption") else "PROMPT")
        return p

    native = "the model's native size"
    from_image = "the image's size rounded down to the VAE factor"

    g = command("generate", "text to image",
                "Text to image. With --hires-fix, AUTOMATIC1111's \"Hires. fix\": generate at "
                "--height x --width, upscale by --hires-scale and denoise that again, image to "
                "image, at the larger size.",
                "  ldm generate \"a red circle\" --seed 1 --out circle.png\n"
                "  ldm generate \"a red circle\" --hires-fix --hires-scale 2 --out big.png\n"
                "  ldm generate --from-image circle.png --out again.png    # the same pixels",
                "what to draw")
    _add_common(g, size=native)
    g.add_argument("--hires-fix", action="store_true",
                   help="add the second, larger pass (the --hires-* options need it, unless "
                        "--from-image's PNG has one)")
    g.add_argument("--hires-scale", type=float, metavar="X",
                   help="upscale factor in [1, 8] (default {=HiresFix.scale})")
    g.add_argument("--hires-steps", type=int, metavar="N",
                   help="steps of the second pass; 0 = --steps (default {=HiresFix.steps})")
    g.add_argument("--hires-upscaler", choices=_choices("Upscaler"),
                   help="latent*: interpolate the latents (bilinear, bicubic, nearest); lanczos: "
                        "decode, resize the pixels, encode (default {=HiresFix.upscaler})")
    g.add_argument("--hires-strength", type=float, metavar="S",
                   help="denoising strength of the second pass in (0, 1]; latent upscales need "
                        "about 0.5 or more (default {=HiresFix.strength})")

    i = command("img2img", "image to image (SDEdit)",
                "Image to image (SDEdit): the --image is encoded, noised to --strength and "
                "denoised under the prompt over the last int(steps x strength) steps. Low "
                "strength keeps the image's layout and colours, 1 ignores the image.",
                "  ldm img2img \"a watercolour painting\" --image photo.png --strength 0.6\n"
                "  ldm img2img \"a blue square\" --image in.png --height 512 --width 768 "
                "--resize-mode crop\n"
                "  ldm img2img --from-image out.png --image photo.png   # the same pixels",
                "what the result should show")
    _add_common(i, size=from_image)
    _add_image(i)
    _add_strength(i, "how much of the image is repainted; 1 ignores it")
    _add_resize(i)
    _add_init_latents(i)

    n = command("inpaint", "repaint the masked part of an image",
                "Inpainting: repaint the part of --image that --mask marks and keep the rest. "
                "The mask is a separate image of the same size: WHITE = repaint, BLACK = keep "
                "(grey in between after --mask-blur; --invert-mask if yours is the other way "
                "round). An inpainting UNet (9 input channels) also sees the mask; any other "
                "UNet gets the kept region put back at every step.",
                "  ldm inpaint \"a yellow star\" --image scene.png --mask star-mask.png\n"
                "  ldm inpaint \"a face\" --image big.png --mask face.png --only-masked "
                "--padding 32\n"
                "  ldm inpaint --from-image out.png --image scene.png --mask star-mask.png",
                "what to paint where the mask is white")
    _add_common(n, size=from_image)
    _add_image(n)
    n.add_argument("--mask", required=True, metavar="FILE",
                   help="the mask: same size as --image, white = repaint, black = keep (a "
                        "colour image is read by its luminance; a one-colour image with "
                        "transparency by its alpha: opaque = repaint)")
    n.add_argument("--invert-mask", action="store_true",
                   help="swap repaint and keep (give it again with --from-image)")
    n.add_argument("--mask-blur", type=int, metavar="PX",
                   help="Gaussian blur radius of the mask's edge, to hide the seam "
                        "(default {=mask_blur})")
    n.add_argument("--only-masked", action=argparse.BooleanOptionalAction,
                   help="AUTOMATIC1111's \"Inpaint area: Only masked\": generate just the "
                        "mask's bounding box (plus --padding) at the full generation size, then "
                        "paste it back: more detail for small regions")
    n.add_argument("--padding", type=int, metavar="PX",
                   help="pixels around the mask's box with --only-masked (default {=padding})")
    _add_overlay(n)
    _add_strength(n, "1 repaints the masked part from noise, lower keeps more of it")
    _add_resize(n)
    _add_init_latents(n)

    o = command("outpaint", "extend an image beyond its borders",
                "Outpainting: add --left/--right/--top/--bottom pixels to --image, fill the new "
                "border (--fill) and inpaint it together with a thin --overlap strip of the "
                "original, so the seam is repainted too. The canvas (image plus border) must "
                "be a multiple of the VAE factor unless --height/--width are given.",
                "  ldm outpaint \"a wide beach\" --image beach.png --left 128 --right 128\n"
                "  ldm outpaint \"sky\" --image in.png --top 64 --fill color --color 120,160,255",
                "what the new border should show")
    _add_common(o, size="the canvas's size")
    _add_image(o)
    for side in ("left", "right", "top", "bottom"):
        o.add_argument(f"--{side}", type=int, metavar="PX",
                       help=f"pixels to add on the {side} (default {{={side}}})")
    o.add_argument("--fill", choices=_choices("OutpaintFill"),
                   help="what the border starts as: the image's edge pixels repeated, seeded "
                        "noise, or --color (default {=fill})")
    o.add_argument("--color", type=_rgb, metavar="R,G,B",
                   help="the border colour for --fill color (default {=color})")
    o.add_argument("--overlap", type=int, metavar="PX",
                   help="pixels of the original repainted along each seam (default {=overlap})")
    _add_overlay(o)
    o.add_argument("--mask-blur", type=int, metavar="PX",
                   help="blur radius of the border mask's edge (default {=mask_blur})")
    _add_strength(o, "1 paints the border from noise, lower keeps more of the fill")

    v = command("vary", "variations of an image",
                "Variations: --image is DDIM-inverted under its CAPTION to the noise that maps "
                "back to it, then sampled again from there with --eta > 0 and a fresh seed per "
                "variant. --eta 0 reconstructs the image (--psnr says how well); a lower "
                "--strength makes closer variants.",
                "  ldm vary \"a red circle\" --image circle.png --num-images 4 --out var.png\n"
                "  ldm vary \"a red circle\" --image circle.png --eta 0.3 --strength 0.8",
                "a caption of the image (what it shows)")
    _add_common(v, size=from_image)
    _add_image(v)
    _add_strength(v, "1 inverts all the way to noise, lower re-noises part-way (closer)")
    _add_resize(v)
    v.add_argument("--psnr", action="store_true",
                   help="also print the inversion's reconstruction PSNR (DDIM with eta 0 back "
                        "from the inverted noise, against the image's VAE round trip; one more "
                        "inversion and sampling run): low values mean the caption or --steps "
                        "do not fit the image")

    t = command("interpolate", "frames between two prompts or images",
                "Interpolation: --frames images from (PROMPT, --seed) to (--to, --end-seed), "
                "the noise and the text conditioning moved along great circles (slerp). With "
                "--image / --end-image an end is that image's DDIM-inverted noise instead. "
                "Writes name-0.png ... name-(N-1).png, a grid name-grid.png, and with --gif an "
                "animation.",
                "  ldm interpolate \"a red circle\" --to \"a blue square\" --frames 8 "
                "--out walk.png --gif walk.gif\n"
                "  ldm interpolate \"a circle\" --seed 1 --end-seed 2   # the noise only",
                "the prompt of the first frame")
    _add_common(t, size=native + " (an --image's, rounded down to the VAE factor)")
    t.add_argument("--to", dest="end_prompt", metavar="END_PROMPT",
                   help="the prompt of the last frame (default: PROMPT)")
    t.add_argument("--end-seed", type=int, help="the seed of the last frame "
                                                "(default {=end_seed})")
    _add_image(t, required=False, help="start from this image's inverted noise (optional)")
    t.add_argument("--end-image", metavar="FILE",
                   help="end at this image's inverted noise (optional)")
    t.add_argument("--frames", type=int, metavar="N",
                   help="images from end to end, both included, at least 2 (default {=frames})")
    t.add_argument("--gif", metavar="FILE.gif|FILE.webp",
                   help="also write the frames as an animation (GIF or WebP by the name)")

    e = command("edit", "move an image toward another caption",
                "Text-diff edit (unCLIP): --image is DDIM-inverted under its CAPTION, then "
                "re-generated from that noise with the text conditioning moved toward --to by "
                "each of --amounts (0 reconstructs the image, 1 is the whole difference). One "
                "PNG per amount, name-0.png ..., and a grid name-grid.png.",
                "  ldm edit \"a red circle\" --to \"a blue circle\" --image circle.png "
                "--out edit.png\n"
                "  ldm edit \"a cat\" --to \"a dog\" --image cat.png --amounts 0.5,1",
                "a caption of the image (what it shows)")
    _add_common(e, size=from_image)
    _add_image(e)
    e.add_argument("--to", dest="target_prompt", metavar="TARGET",
                   help="the caption to move toward (needed, but for --from-image)")
    e.add_argument("--amounts", type=_number_list, metavar="A,B,...",
                   help="how far along the difference, one image each (default {=amounts})")
    _add_strength(e, "1 inverts all the way to noise")
    _add_resize(e)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error instead of the whole usage block (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ldm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    _image_commands(sub)
    for name in RERANK_COMMANDS:
        add_rerank_options(sub.choices[name])
    add_clip_parsers(sub)           # classify, clip-score

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
    e.add_argument("--rerank", type=int, default=1, metavar="N",
                   help="make N candidates per image and keep the one the model's CLIP scores "
                        "best against its prompt (default 1: no reranking)")
    e.add_argument("--grid", help="also save a grid of one image per prompt to this PNG")
    e.set_defaults(func=cmd_eval)

    # `serve` and `ui`: their parsers import no server library (FastAPI, torch) until they run.
    from ldm_engine.apps.server.cli_serve import add_serve_parsers
    add_serve_parsers(sub)
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
