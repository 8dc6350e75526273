"""The CLIP commands: `ldm classify`, `ldm clip-score`, and `--rerank N` on the image commands.

Each command's numbers are ClipModel's (ldm_engine.clip) on the same images, read from its
--json output (exact) and its lines (as rounded); a reranked run writes the candidate the
Python API chooses and prints the API's score; every bad input is one stderr line, exit 2,
before a CLIP (or the generation model) is loaded where the input alone shows it is wrong.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import ldm_engine.clip
from ldm_engine.apps.cli import main
from ldm_engine.errors import UserInputError
from pipelines import GenerationParams, TextToImage, read_png_params
from pipelines.images import load_image
from pipelines.params import candidate_seed
from pipelines.pnginfo import read_png_text, read_rerank_choice, save_png
from pipelines.prompts import plain_text

ONE_STEP = ["--steps", "1", "--quiet", "--device", "cpu", "--dtype", "fp32"]
LABELS = ["a red circle", "a blue square", "a green triangle"]


class Trapped(AssertionError):
    """A CLIP was loaded where the bad input should have been refused first."""


@pytest.fixture
def no_clip_load(monkeypatch):
    def trapped(*args, **kwargs):
        raise Trapped("load_clip ran before the bad input was reported")
    monkeypatch.setattr(ldm_engine.clip, "load_clip", trapped)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three 64 x 64 images (a red disc, a blue square, noise), a JPEG, a PNG without
    parameters, a file that is no image, and a PNG the engine wrote (with a weighted prompt)."""
    root = tmp_path_factory.mktemp("clip-inputs")
    yy, xx = np.mgrid[:64, :64]
    disc = np.full((64, 64, 3), 255, np.uint8)
    disc[(yy - 32) ** 2 + (xx - 32) ** 2 < 18 ** 2] = (220, 20, 20)
    square = np.full((64, 64, 3), 255, np.uint8)
    square[16:48, 16:48] = (20, 20, 220)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for name, a in (("disc", disc), ("square", square), ("noise", noise)):
        Image.fromarray(a).save(root / f"{name}.png")
    Image.fromarray(square).save(root / "square.jpg", quality=95)
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    save_png(Image.fromarray(disc), root / "made.png",
             GenerationParams(prompt="a (red:1.3) circle BREAK on white", seed=1,
                              height=64, width=64))
    return root


@pytest.fixture(scope="module")
def positive_clip_dir(tmp_path_factory, tiny_clip_dir):
    """tiny_clip_dir's CLIP with its image projection negated. The random tiny CLIP puts every
    image on the far side of every text (all cosines < 0: CLIP score 0); negating W_i flips
    each cosine's sign, so this one's scores are positive and the CLIP score is not trivially 0."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("clip") / "positive-clip"
    shutil.copytree(tiny_clip_dir, path,
                    ignore=lambda folder, names: [n for n in names if n in ("unet", "vae")])
    weights = path / "image_encoder" / "model.safetensors"
    state = load_file(weights)
    state["visual_projection.weight"] = -state["visual_projection.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def positive_clip(positive_clip_dir):
    return ldm_engine.clip.load_clip(positive_clip_dir)


def _run(argv, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def _images(root, names):
    return [load_image(root / n, "image") for n in names]


# --- classify --------------------------------------------------------------------------------

def test_classify_json_equals_the_api(inputs, tiny_clip_dir, tiny_clip_model, capsys):
    names = ["disc.png", "square.png", "noise.png"]
    out = _run(["classify", *[str(inputs / n) for n in names], "--labels", ",".join(LABELS),
                "--clip", str(tiny_clip_dir), "--device", "cpu", "--json"], capsys)
    got = json.loads(out)
    assert got["labels"] == LABELS and got["templates"] == ["{}"]
    assert got["clip"] == tiny_clip_dir.name
    assert [r["image"] for r in got["images"]] == [str(inputs / n) for n in names]
    probs = torch.tensor([[r["probabilities"][label] for label in LABELS]
                          for r in got["images"]])
    want = tiny_clip_model.classify(_images(inputs, names), LABELS)
    torch.testing.assert_close(probs, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(1), torch.ones(3), rtol=0, atol=1e-6)


def test_classify_templates_and_labels_file(inputs, tiny_clip_dir, tiny_clip_model, tmp_path,
                                            capsys):
    """Several --template are passed on (averaged by the API); labels read from a file."""
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(LABELS) + "\n\n")         # a trailing blank line is fine
    templates = ["a picture of {}", "{}, drawn", "a small {} on white"]
    out = _run(["classify", str(inputs / "disc.png"), "--labels-file", str(labels_file),
                *[a for t in templates for a in ("--template", t)],
                "--clip", str(tiny_clip_dir), "--device", "cpu", "--json"], capsys)
    got = json.loads(out)
    assert got["templates"] == templates
    probs = torch.tensor([got["images"][0]["probabilities"][label] for label in LABELS])
    image = _images(inputs, ["disc.png"])
    torch.testing.assert_close(probs, tiny_clip_model.classify(image, LABELS, templates)[0],
                               rtol=0, atol=1e-6)
    # The templates reached the model: without them the probabilities differ.
    assert (probs - tiny_clip_model.classify(image, LABELS)[0]).abs().max() > 1e-4


def test_classify_lines_show_the_top_labels(inputs, tiny_clip_dir, tiny_clip_model, capsys):
    names = ["disc.png", "noise.png"]
    out = _run(["classify", *[str(inputs / n) for n in names], "--labels", ",".join(LABELS),
                "--top", "2", "--clip", str(tiny_clip_dir), "--device", "cpu"], capsys)
    lines = out.splitlines()
    assert len(lines) == 2 * 3                      # per image: its path, then 2 labels
    want = tiny_clip_model.classify(_images(inputs, names), LABELS)
    for k, name in enumerate(names):
        block = lines[3 * k:3 * k + 3]
        assert block[0] == str(inputs / name)
        p, order = want[k].topk(2)
        for line, prob, i in zip(block[1:], p.tolist(), order.tolist()):
            assert line == f"  {100 * prob:6.2f} %  {LABELS[i]}"


# --- clip-score ------------------------------------------------------------------------------

def test_clip_score_reads_the_png_prompt(inputs, positive_clip_dir, positive_clip, capsys):
    """Without --prompt: the PNG's own prompt, its syntax removed (as reranking scores it)."""
    out = _run(["clip-score", str(inputs / "made.png"), "--clip", str(positive_clip_dir),
                "--device", "cpu", "--json"], capsys)
    got = json.loads(out)
    text = "a red circle on white"
    assert plain_text("a (red:1.3) circle BREAK on white") == text
    assert got["images"][0]["prompt"] == text
    image = _images(inputs, ["made.png"])
    want = positive_clip.score(image, [text])
    assert want[0] > 0 and got["images"][0]["score"] == pytest.approx(float(want[0]), abs=1e-5)
    cos = positive_clip.similarity(image, [text])[0, 0]
    assert got["images"][0]["cosine"] == pytest.approx(float(cos), abs=1e-6)
    assert got["mean"] == got["images"][0]["score"]


def test_clip_score_one_prompt_or_one_each(inputs, positive_clip_dir, positive_clip,
                                           tiny_clip_dir, tmp_path, capsys):
    names = ["disc.png", "square.png", "square.jpg"]
    paths = [str(inputs / n) for n in names]
    images = _images(inputs, names)
    clip = ["--clip", str(positive_clip_dir), "--device", "cpu"]
    # One --prompt for all: the lines, then their mean.
    lines = _run(["clip-score", *paths, "--prompt", "a red circle", *clip], capsys).splitlines()
    want = positive_clip.score(images, "a red circle").tolist()
    assert min(want) > 0
    assert lines == [f"{s:6.2f}  {p}" for s, p in zip(want, paths)] + \
        [f"{sum(want) / 3:6.2f}  mean of 3 images"]
    # One per image, from a file.
    prompts = ["a red circle", "a blue square", "a blue square, small"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    got = json.loads(_run(["clip-score", *paths, "--prompts-file", str(tmp_path / "prompts.txt"),
                           *clip, "--json"], capsys))
    want = positive_clip.score(images, prompts)
    assert [r["prompt"] for r in got["images"]] == prompts
    torch.testing.assert_close(torch.tensor([r["score"] for r in got["images"]]), want,
                               rtol=0, atol=1e-5)
    cos = positive_clip.similarity(images, prompts).diagonal()
    torch.testing.assert_close(torch.tensor([r["cosine"] for r in got["images"]]), cos,
                               rtol=0, atol=1e-6)
    # The same pairs as repeated --prompt.
    again = json.loads(_run(["clip-score", *paths, *[a for t in prompts for a in ("--prompt", t)],
                             *clip, "--json"], capsys))
    assert again == got
    # The unflipped CLIP: every cosine negative, every CLIP score max(cos, 0) = 0.
    got = json.loads(_run(["clip-score", *paths, "--prompt", "a red circle", "--clip",
                           str(tiny_clip_dir), "--device", "cpu", "--json"], capsys))
    assert all(r["cosine"] < 0 and r["score"] == 0 for r in got["images"])


# --- generate --rerank -----------------------------------------------------------------------

def test_generate_rerank_writes_the_best_and_prints_its_score(tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "r.png"
    prompt = "a red circle"
    lines = _run(["generate", prompt, "--model", str(tiny_clip_dir), "--out", str(out),
                  "--seed", "3", "--rerank", "2", "--save-candidates", *ONE_STEP],
                 capsys).splitlines()
    # The Python API on the same folder: its choice and scores.
    pipe = TextToImage.from_folder(tiny_clip_dir)
    request = GenerationParams(prompt=prompt, steps=1, seed=3, rerank=2)
    result = pipe.run(request)
    ranked = result.candidates[0]
    assert len(ranked) == 2 and ranked[0].score >= ranked[1].score
    best = ranked[0]
    assert lines[0] == str(out)
    assert lines[1] == (f"{out}: rerank score {best.score:.4f} (cosine to the prompt), seed "
                        f"{best.seed}, best of 2")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(best.image))
    # The PNG records the request (its own seed, rerank 2) and what reranking chose.
    p = read_png_params(out)
    assert (p.seed, p.rerank) == (3, 2)
    choice = read_rerank_choice(read_png_text(out))
    assert choice.seed == best.seed and choice.score == pytest.approx(best.score, abs=5e-5)
    # Every candidate, best first, each a plain generation with its own seed.
    files = [tmp_path / f"r-0-{c}.png" for c in range(2)]
    assert lines[2:] == [f"{f}: candidate score {c.score:.4f}, seed {c.seed}"
                         for f, c in zip(files, ranked)]
    for f, c in zip(files, ranked):
        assert np.array_equal(np.asarray(Image.open(f)), np.asarray(c.image))
        q = read_png_params(f)
        assert (q.seed, q.rerank) == (c.seed, 1)
    assert {c.seed for c in ranked} == {3, candidate_seed(3, 1)}
    # clip-score of the kept PNG: its cosine is the rerank score (both read the 8-bit image).
    got = json.loads(_run(["clip-score", str(out), "--clip", str(tiny_clip_dir), "--device",
                           "cpu", "--json"], capsys))
    assert got["images"][0]["cosine"] == pytest.approx(best.score, abs=1e-6)
    assert got["images"][0]["score"] == pytest.approx(100 * max(best.score, 0.0), abs=1e-4)


def test_generate_rerank_several_images_and_another_clip(tiny_dir, tiny_clip_dir, tmp_path,
                                                         capsys):
    """--clip gives a model without an image encoder a CLIP; image k's candidates are
    name-k-c.png."""
    out = tmp_path / "g.png"
    lines = _run(["generate", "a blue square", "--model", str(tiny_dir), "--clip",
                  str(tiny_clip_dir), "--out", str(out), "--seed", "7", "--num-images", "2",
                  "--rerank", "2", "--save-candidates", *ONE_STEP], capsys).splitlines()
    assert lines[:2] == [str(tmp_path / "g-0.png"), str(tmp_path / "g-1.png")]
    assert [line.split(":")[0] for line in lines[2:4]] == lines[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "g-0-0.png", "g-0-1.png", "g-0.png", "g-1-0.png", "g-1-1.png", "g-1.png"]
    for k in range(2):
        seeds = {read_png_params(tmp_path / f"g-{k}-{c}.png").seed for c in range(2)}
        assert seeds == {7 + k, candidate_seed(7 + k, 1)}
        assert read_png_params(tmp_path / f"g-{k}.png").seed == 7 + k


# --- bad input: one line, exit 2, before the CLIP (and the model) is read -----------------------

def _bad(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


CLASSIFY_ROWS = [
    (["{root}/none.png", "--labels", "a,b"], "image not found"),
    (["{root}/garbage.png", "--labels", "a,b"], "cannot read the image"),
    (["{disc}", "--labels", ""], "no labels"),
    (["{disc}", "--labels", "a,,b"], "label 2 of 3 is empty"),
    (["{disc}", "--labels", "a, b,a"], "'a' is given twice"),
    (["{disc}", "--labels", "a"], "give at least two"),
    (["{disc}", "--labels", "a,b", "--template", "a picture"], "has no {} where the label"),
    (["{disc}", "--labels", "a,b", "--top", "0"], "--top must be at least 1"),
    (["{disc}", "--labels-file", "{root}/none.txt"], "no such file"),
    (["{disc}", "--labels-file", "{blank}"], "has no non-blank line"),
    (["{disc}", "--labels", "a,b", "--clip", "{root}/none"], "no such file or folder"),
    (["{disc}", "--labels", "a,b", "--clip-arch", "ViT-B-32"], "give --clip too"),
    (["{disc}", "--labels", "a,b", "--labels-file", "{blank}"], "not allowed with argument"),
    (["{disc}"], "one of the arguments --labels --labels-file is required"),
]


@pytest.mark.parametrize("argv,message", CLASSIFY_ROWS,
                         ids=[" ".join(r[0])[:40] for r in CLASSIFY_ROWS])
def test_bad_classify(inputs, tiny_clip_dir, tmp_path, capsys, no_clip_load, argv, message):
    (tmp_path / "blank.txt").write_text("\n  \n")
    names = {"root": inputs, "disc": inputs / "disc.png", "blank": tmp_path / "blank.txt"}
    argv = [a.format(**names) for a in argv]
    if "--clip" not in argv and "--clip-arch" not in argv:
        argv += ["--clip", str(tiny_clip_dir)]
    line = _bad(["classify", *argv, "--device", "cpu"], capsys)
    assert message in line, line


CLIP_SCORE_ROWS = [
    (["{noise}"], "carries no generation parameters"),
    (["{jpg}"], "cannot read the PNG"),
    (["{root}/none.png", "--prompt", "x"], "image not found"),
    (["{disc}", "{noise}", "{disc}", "--prompt", "x", "--prompt", "y"],
     "2 --prompt options for 3 images"),
    (["{disc}", "--prompt", "  "], "is empty"),
    (["{disc}", "--prompt", "x", "--prompts-file", "{root}/none.txt"],
     "not allowed with argument"),
]


@pytest.mark.parametrize("argv,message", CLIP_SCORE_ROWS,
                         ids=[" ".join(r[0])[:40] for r in CLIP_SCORE_ROWS])
def test_bad_clip_score(inputs, tiny_clip_dir, capsys, no_clip_load, argv, message):
    names = {"root": inputs, "disc": inputs / "disc.png", "noise": inputs / "noise.png",
             "jpg": inputs / "square.jpg"}
    argv = [a.format(**names) for a in argv]
    line = _bad(["clip-score", *argv, "--clip", str(tiny_clip_dir), "--device", "cpu"], capsys)
    assert message in line, line
    if "carries no" in message or "cannot read the PNG" in message:
        assert "give --prompt" in line


@pytest.mark.parametrize("clip", ["tiny", "empty"])
def test_a_clip_that_is_not_one(inputs, tiny_dir, tmp_path, capsys, clip):
    """A model folder without an image encoder, and a folder that holds no CLIP at all: one
    line from load_clip, which reads no weights to tell."""
    (tmp_path / "empty").mkdir()
    path = tiny_dir if clip == "tiny" else tmp_path / "empty"
    line = _bad(["classify", str(inputs / "disc.png"), "--labels", "a,b", "--clip", str(path),
                 "--device", "cpu"], capsys)
    assert ("has no CLIP image tower" in line and "--clip PATH" in line if clip == "tiny" else
            "is not a CLIP" in line), line


GENERATE_ROWS = [
    (["--rerank", "2"], "--rerank needs a CLIP image encoder"),   # tiny_dir has none
    (["--rerank", "0"], "rerank must be a positive integer"),
    (["--rerank", "65"], "more than 64 candidates"),
    (["--save-candidates"], "--save-candidates is for reranking"),
    (["--clip", "{clip}"], "--clip is for reranking"),
    (["--rerank", "2", "--clip", "{root}/none"], "--clip {root}/none: no such file"),
    (["--rerank", "2", "--clip", "{empty}"], "is not a CLIP"),
    (["--rerank", "2", "--clip-arch", "ViT-B-32"], "give --clip too"),
    (["--rerank", "2", "--clip", "{clip}", "--save-candidates", "--out", "{root2}/o.png"],
     "o-0-1.png is a folder"),
]


@pytest.mark.parametrize("extra,message", GENERATE_ROWS,
                         ids=[" ".join(r[0])[:40] for r in GENERATE_ROWS])
def test_bad_generate_rerank(inputs, tiny_dir, tiny_clip_dir, tmp_path, capsys, no_compute,
                             extra, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "out" / "o-0-1.png").mkdir(parents=True)     # candidate 1 would land on a folder
    names = {"root": inputs, "clip": tiny_clip_dir, "empty": tmp_path / "empty",
             "root2": tmp_path / "out"}
    extra = [a.format(**names) for a in extra]
    line = _bad(["generate", "a red circle", "--model", str(tiny_dir), "--out",
                 str(tmp_path / "x.png"), *ONE_STEP, *extra], capsys)
    assert line.startswith("ldm generate: error: ") and message.format(**names) in line, line
    assert no_compute["load"] == 0, "the model's weights were read before the error"
    assert not (tmp_path / "x.png").exists()


def test_sequence_commands_have_no_rerank(tiny_dir, tmp_path, capsys):
    line = _bad(["interpolate", "a", "--to", "b", "--model", str(tiny_dir), "--rerank", "2"],
                capsys)
    assert "unrecognized arguments: --rerank" in line


# --- the server: rerank reaches the job service's checks ---------------------------------------

def test_server_checks_rerank_before_queueing(tiny_dir, tiny_clip_dir, tmp_path):
    """A job with rerank > 1 is refused at submission (not when it runs) on a model without a
    CLIP, and its candidates count against the server's images-per-request limit."""
    pytest.importorskip("fastapi")
    from ldm_engine.apps.server.config import Limits, ServerConfig
    from ldm_engine.apps.server.service import JobService

    config = ServerConfig(models=(tiny_clip_dir, tiny_dir), out_dir=tmp_path,
                          limits=Limits(max_images=8))
    service = JobService(config, start_workers=False)
    try:
        request = GenerationParams(prompt="a red circle", steps=1, rerank=4)
        service.check(request, num_images=2, model="tiny-clip")         # 8 candidates: fine
        with pytest.raises(UserInputError, match="makes 12 candidates"):
            service.check(request, num_images=3, model="tiny-clip")
        with pytest.raises(UserInputError, match="model tiny has none"):
            service.check(request, num_images=1, model="tiny")
        service.check(request.replace(rerank=1), num_images=1, model="tiny")
    finally:
        service.close()


class _Reduce:
    """An object whose unpickling calls func(*args)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_a_clip_pickle_with_code_needs_trust_pickle(inputs, tiny_clip, tmp_path, capsys):
    """A .bin CLIP holding code is refused in one line and never run; --trust-pickle reaches
    load_clip (the payload, a harmless touch, then runs, with the loader's warning)."""
    import os

    canary = tmp_path / "canary"
    folder = tmp_path / "hf-clip"
    tiny_clip.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    state = dict(tiny_clip.state_dict())
    state["x"] = _Reduce(os.system, f"touch {canary}")
    torch.save(state, folder / "pytorch_model.bin")
    capsys.readouterr()                     # save_pretrained's own progress bar
    argv = ["classify", str(inputs / "disc.png"), "--labels", "red,blue", "--clip", str(folder)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trust-pickle" in err, err
    assert not canary.exists()
    main(argv + ["--trust-pickle"])
    capsys.readouterr()
    assert canary.exists()
