"""The CLIP commands of ``ldm``: ``classify`` (zero-shot labels) and ``clip-score``, and the
image commands' reranking options (``--rerank N --clip PATH --save-candidates``).

The models and the math are ldm_engine.clip's (ClipModel, load_clip); this module turns command
lines into its calls and its answers into lines. Importing it is cheap (no torch): `ldm --help`
builds these parsers. Bad input ends as one UserInputError line (exit 2 in cli.main), checked
before any CLIP is loaded where that is possible.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from ldm_engine.errors import UserInputError
from ldm_engine.paths import BUNDLED_MODEL

# The image commands whose requests can be reranked: a sequence's frames (interpolate, edit)
# share one noise, so they have no candidates to choose between (pipelines refuse rerank > 1).
RERANK_COMMANDS = ("generate", "img2img", "inpaint", "outpaint", "vary")
# How many images one CLIP image-tower call embeds (bounds the activations' memory; the
# embeddings do not depend on the batch beyond float rounding).
IMAGE_BATCH = 32
# classify's default --top: CLIP's paper (and its notebook) reports top-5.
DEFAULT_TOP = 5

CLIP_HELP = ("the CLIP: a model folder with an image encoder (image_encoder/, text_projection/), "
             "a transformers CLIPModel folder, or an open_clip checkpoint file (.safetensors; "
             ".pt/.bin are read without unpickling code)")
TRUST_HELP = ("unpickle a .pt/.bin --clip file fully, running any code in it (only for files "
              "from a source you trust; default: safe loading, which refuses them)")
ARCH_HELP = ("the open_clip architecture of a --clip checkpoint file without an "
             "open_clip_config.json beside it, e.g. ViT-B-32 (read from an installed "
             "open_clip_torch's model configs)")


# --- the image commands: --rerank, --clip, --save-candidates ------------------------------------

def add_rerank_options(parser: argparse.ArgumentParser) -> None:
    """An image command's reranking options (the request field `rerank` and where its CLIP
    comes from); `{=rerank}` in a help text shows the request type's default."""
    g = parser.add_argument_group("reranking by CLIP (DALL-E's reranker)")
    g.add_argument("--rerank", type=int, metavar="N",
                   help="make N candidates per image, each with its own seed "
                        "(pipelines.params.candidate_seed; candidate 0 is the plain image), and "
                        "keep the one whose CLIP embedding is nearest the prompt's, printing "
                        "its score (default {=rerank}: off)")
    g.add_argument("--clip", metavar="PATH",
                   help=CLIP_HELP + " (default: --model's own, if it has an image encoder)")
    g.add_argument("--clip-arch", metavar="NAME", help=ARCH_HELP)
    g.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)
    g.add_argument("--save-candidates", action="store_true",
                   help="also write every candidate, best first: name-K-C.png for image K, "
                        "candidate rank C (each re-plays as a plain generation with its seed)")


def candidate_files(outputs: list[Path], rerank: int) -> list[list[Path]]:
    """Where --save-candidates writes: for the image saved at `name.png` (or `name-K.png`) of
    a run, name-K-0.png (the best) ... name-K-(N-1).png, K its index in the run."""
    out = []
    for k, path in enumerate(outputs):
        # output_paths names image k of several `name-k.png` already; one image is `name.png`.
        stem = path.stem if len(outputs) > 1 else f"{path.stem}-{k}"
        out.append([path.with_name(f"{stem}-{c}{path.suffix or '.png'}")
                    for c in range(rerank)])
    return out


def rerank_files(args: argparse.Namespace, request, model: Path,
                 outputs: list[Path]) -> list[Path]:
    """The reranking options checked against the request (whose `rerank` may come from
    --from-image's PNG) before any weights are read, so that a CLIP is at hand for rerank > 1;
    the files --save-candidates will write (for the early writability check)."""
    rerank = request.rerank
    if rerank == 1:
        for given, name in ((args.clip, "--clip"), (args.clip_arch, "--clip-arch"),
                            (args.save_candidates, "--save-candidates")):
            if given:
                raise UserInputError(f"{name} is for reranking: add --rerank N (N > 1)")
        return []
    if args.clip_arch and not args.clip:
        raise UserInputError("--clip-arch names the architecture of a --clip checkpoint file; "
                             "give --clip too")
    if args.clip:
        check_clip_path(args.clip)
    else:
        from ldm_engine.clip import has_clip

        if not (model.is_dir() and has_clip(model)):
            raise UserInputError(f"--rerank needs a CLIP image encoder: {model} has no "
                                 "image_encoder/; pass one with --clip PATH")
    if not args.save_candidates:
        return []
    return [f for files in candidate_files(outputs, rerank) for f in files]


def check_clip_path(path: str) -> None:
    """What a --clip path can be told wrong by without reading it: missing."""
    if not Path(path).exists():
        raise UserInputError(f"--clip {path}: no such file or folder")


def load_clip_arg(args: argparse.Namespace):
    """The --clip CLIP (ldm_engine.clip.load_clip), on --device."""
    from ldm_engine.clip import load_clip
    from ldm_engine.precision import resolve_device

    kwargs = {"arch": args.clip_arch} if args.clip_arch else {}
    return load_clip(args.clip, device=resolve_device(args.device),
                     trust_pickle=getattr(args, "trust_pickle", False), **kwargs)


def report_rerank(args: argparse.Namespace, result, outputs: list[Path]) -> None:
    """After a reranked run: one line per kept image with its score, and with
    --save-candidates every candidate's PNG (best first), each named on a line."""
    candidates = getattr(result, "candidates", None)
    if not candidates:
        return
    from pipelines.pnginfo import save_png

    for path, ranked in zip(outputs, candidates):
        best = ranked[0]
        print(f"{path}: rerank score {best.score:.4f} (cosine to the prompt), seed {best.seed}, "
              f"best of {len(ranked)}")
    if args.save_candidates:
        for files, ranked in zip(candidate_files(outputs, len(candidates[0])), candidates):
            for file, candidate in zip(files, ranked):
                save_png(candidate.image, file, candidate.params)
                print(f"{file}: candidate score {candidate.score:.4f}, seed {candidate.seed}")


# --- classify and clip-score ----------------------------------------------------------------

def add_clip_parsers(subparsers) -> None:
    """`classify` and `clip-score` on the `ldm` command's subparsers."""
    c = subparsers.add_parser(
        "classify", help="zero-shot classification of images against labels (CLIP)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
                    "Zero-shot classification (Radford et al. 2021): each label becomes a "
                    "caption through each --template, the captions' CLIP text embeddings are "
                    "averaged per label, and an image's probabilities are the softmax of its "
                    "cosine similarities to the labels times CLIP's logit scale. Prints each "
                    "image's --top labels; --json prints every probability.", 79),
        epilog="examples:\n"
               "  ldm classify a.png b.png --labels \"a red circle,a blue square\"\n"
               "  ldm classify *.png --labels-file colours.txt --template \"a {} shape\" "
               "--template \"something {}\" --json\n"
               "  ldm classify photo.jpg --labels cat,dog --clip path/to/clip-vit-b-32")
    c.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or WebP files")
    labels = c.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", metavar="A,B,...",
                        help="the labels, separated by commas")
    labels.add_argument("--labels-file", metavar="FILE",
                        help="the labels, one a line (blank lines are skipped)")
    c.add_argument("--template", action="append", metavar="TEXT",
                   help="a caption with {} where the label goes, e.g. \"a picture of {}\"; "
                        "repeatable: several are averaged per label (default: the label "
                        "itself)")
    c.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="K",
                   help=f"labels printed per image, most probable first (default {DEFAULT_TOP})")
    _clip_options(c)
    c.set_defaults(func=cmd_classify)

    s = subparsers.add_parser(
        "clip-score", help="CLIP score of images against their prompts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
                    "CLIP score (Hessel et al. 2021, as torchmetrics computes it): 100 x "
                    "max(cosine(image, prompt), 0) in CLIP's embedding space. Without --prompt "
                    "each image is scored against the prompt in its PNG parameters (a PNG this "
                    "engine or AUTOMATIC1111 wrote); prompt syntax such as (word:1.2) is "
                    "removed first, as --rerank does.", 79),
        epilog="examples:\n"
               "  ldm clip-score image-0.png image-1.png        # their own prompts\n"
               "  ldm clip-score a.png b.png --prompt \"a red circle\"\n"
               "  ldm clip-score a.png b.png --prompts-file prompts.txt --json")
    s.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or WebP files")
    prompts = s.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", metavar="TEXT",
                         help="the prompt: once for every image, or once per image, in order "
                              "(default: each PNG's own prompt)")
    prompts.add_argument("--prompts-file", metavar="FILE",
                         help="prompts one a line: one line for every image, or one per image "
                              "(blank lines are skipped)")
    _clip_options(s)
    s.set_defaults(func=cmd_clip_score)


def _clip_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clip", metavar="PATH",
                   help=CLIP_HELP + " (default: the bundled model)")
    p.add_argument("--clip-arch", metavar="NAME", help=ARCH_HELP)
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")


def cmd_classify(args: argparse.Namespace) -> int:
    if args.labels_file is not None:
        labels = _lines(args.labels_file, "--labels-file")
    else:
        labels = [label.strip() for label in args.labels.split(",")]
    labels = check_labels(labels)
    templates = check_templates(args.template or ["{}"])
    if args.top < 1:
        raise UserInputError(f"--top must be at least 1, got {args.top}")
    images = _load_images(args.images)
    clip = _clip_of(args)
    probs = _batched(lambda chunk: clip.classify(chunk, labels, templates), images)
    if args.json:
        print(json.dumps({
            "clip": clip.name, "labels": labels, "templates": templates,
            "images": [{"image": path, "probabilities": dict(zip(labels, map(float, row)))}
                       for path, row in zip(args.images, probs.tolist())]}, indent=1))
        return 0
    top = min(args.top, len(labels))
    for path, row in zip(args.images, probs):
        print(path)
        values, order = row.topk(top)
        for p, i in zip(values.tolist(), order.tolist()):
            print(f"  {100 * p:6.2f} %  {labels[i]}")
    return 0


def cmd_clip_score(args: argparse.Namespace) -> int:
    from pipelines.prompts import plain_text

    if args.prompts_file is not None:
        prompts, given = _lines(args.prompts_file, "--prompts-file"), "--prompts-file lines"
    elif args.prompt is not None:
        prompts, given = args.prompt, "--prompt options"
    else:
        prompts, given = [_png_prompt(path) for path in args.images], ""
    if len(prompts) == 1:
        prompts = prompts * len(args.images)
    elif len(prompts) != len(args.images):
        raise UserInputError(f"{len(prompts)} {given} for {len(args.images)} images: give one "
                             "for all of them or one per image")
    # The text CLIP sees: the prompt with its weighting syntax removed, as --rerank scores it.
    texts = [plain_text(p) for p in prompts]
    for path, prompt, text in zip(args.images, prompts, texts):
        if not text.strip():
            raise UserInputError(f"the prompt for {path} is empty ({prompt!r} after its syntax "
                                 "is removed): nothing to score against")
    images = _load_images(args.images)
    clip = _clip_of(args)
    n = len(images)
    # cos(image k, text k) of the unit embeddings (each distinct text embedded once), and the
    # CLIP score 100 * max(cos, 0); the cosine is what --rerank ranks by and its PNGs record.
    unique = list(dict.fromkeys(texts))
    text_embeds = clip.text_embeds(unique)[[unique.index(t) for t in texts]]   # (N, P)
    cosines = _batched(lambda chunk, start: (clip.image_embeds(chunk)
                                             * text_embeds[start:start + len(chunk)]).sum(-1),
                       images, with_start=True)
    scores = (100 * cosines.clamp(min=0)).tolist()
    mean = sum(scores) / n
    if args.json:
        print(json.dumps({"clip": clip.name, "mean": mean,
                          "images": [{"image": path, "prompt": text, "score": s, "cosine": c}
                                     for path, text, s, c in zip(args.images, texts, scores,
                                                                 cosines.tolist())]},
                         indent=1))
        return 0
    for path, s in zip(args.images, scores):
        print(f"{s:6.2f}  {path}")
    if n > 1:
        print(f"{mean:6.2f}  mean of {n} images")
    return 0


def check_labels(labels: list[str]) -> list[str]:
    """Labels as given (stripped); none, an empty one or the same one twice is refused."""
    if not labels or labels == [""]:
        raise UserInputError("no labels: give --labels A,B,... or --labels-file FILE")
    seen: dict[str, int] = {}
    for k, label in enumerate(labels, 1):
        if not label:
            raise UserInputError(f"label {k} of {len(labels)} is empty (two commas in a row, or "
                                 "one at an end?)")
        if label in seen:
            raise UserInputError(f"label {label!r} is given twice (labels {seen[label]} and {k}): "
                                 "its probability would be split between the two")
        seen[label] = k
    if len(labels) < 2:
        raise UserInputError(f"one label ({labels[0]!r}) always gets probability 1: give at "
                             "least two")
    return labels


def check_templates(templates: list[str]) -> list[str]:
    """Each template has a {} where the label goes (every {} becomes the label)."""
    for t in templates:
        if "{}" not in t:
            raise UserInputError(f"--template {t!r} has no {{}} where the label goes (e.g. "
                                 "\"a picture of {}\")")
    return templates


def _lines(path: str, option: str) -> list[str]:
    """A text file's non-blank lines, stripped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserInputError(f"{option} {path}: no such file") from None
    except IsADirectoryError:
        raise UserInputError(f"{option} {path} is a folder, not a text file") from None
    except UnicodeDecodeError:
        raise UserInputError(f"{option} {path} is not UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserInputError(f"{option} {path} has no non-blank line")
    return lines


def _png_prompt(path: str) -> str:
    """The prompt in an image's PNG parameters (one line of error if it has none)."""
    from pipelines.pnginfo import parse_parameters, read_png_text

    try:
        return parse_parameters(read_png_text(path)).prompt
    except UserInputError as e:
        raise UserInputError(f"{e}; give --prompt or --prompts-file") from None


def _load_images(paths: list[str]) -> list:
    """Every image read and checked (pipelines.images.load_image) before a CLIP is loaded."""
    from pipelines.images import load_image

    return [load_image(path, "image") for path in paths]


def _clip_of(args: argparse.Namespace):
    """--clip's CLIP, else the bundled model's, on --device."""
    if args.clip is None:
        if args.clip_arch:
            raise UserInputError("--clip-arch names the architecture of a --clip checkpoint "
                                 "file; give --clip too")
        if not BUNDLED_MODEL.is_dir():
            raise UserInputError(f"no --clip given and no bundled model at {BUNDLED_MODEL}")
        args.clip = str(BUNDLED_MODEL)
    check_clip_path(args.clip)
    return load_clip_arg(args)


def _batched(embed, images: list, *, with_start: bool = False):
    """embed(chunk) (or embed(chunk, start)) over IMAGE_BATCH-sized chunks, concatenated."""
    import torch

    parts = []
    for start in range(0, len(images), IMAGE_BATCH):
        chunk = images[start:start + IMAGE_BATCH]
        parts.append(embed(chunk, start) if with_start else embed(chunk))
    return torch.cat(parts).cpu()
