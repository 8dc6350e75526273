"""Reranking (pipelines/rerank.py): N candidates per image, ranked by CLIP similarity to the prompt.

The order is checked against a direct computation (each candidate generated alone, as a plain
request with its seed, and scored with ClipModel.similarity); rerank=1 is the plain call;
chunking changes nothing; the PNG records the request and the choice, and re-plays to the same
choice; bad input (no CLIP, sequence modes, bad values) is refused before any compute.

Tolerance between a candidate made in a batch and alone: 1e-5 on pixels in [0, 1] (the UNet's
batched matmuls round differently; the same bound as test_img2img's batch-vs-single test), which
moves a CLIP score by well under 1e-4.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_engine.errors import GenerationCancelled, UserInputError
from ldm_engine.limits import SizeLimitError
from pipelines import (GenerationParams, GenerationResult, ImageToImageParams, InpaintParams,
                       Observer, TextToImage, read_png_params)
from pipelines.jsonform import request_from_json, request_to_json
from pipelines.params import (MAX_RERANK, RERANK_SEED_STRIDE, EditParams, InterpolationParams,
                              VariationParams, candidate_seed)
from pipelines.pnginfo import format_parameters, parse_parameters, read_png_text, read_rerank_choice
from pipelines.prompts import plain_text

PROMPT = "a (red:1.3) circle BREAK [green] background"
N = 3
STEPS = 2
PIXEL_TOL = 1e-5
SCORE_TOL = 1e-4


@pytest.fixture(scope="module")
def pipe(tiny_clip_dir):
    """The tiny model carrying its CLIP (image_encoder/ beside the text encoder)."""
    return TextToImage.from_folder(tiny_clip_dir)


@pytest.fixture(scope="module")
def requests_():
    return [GenerationParams(prompt=PROMPT, seed=11, steps=STEPS, rerank=N),
            GenerationParams(prompt="a blue square", seed=12, steps=STEPS, rerank=N)]


@pytest.fixture(scope="module")
def reranked(pipe, requests_):
    return pipe.run(requests_)


@pytest.fixture(scope="module")
def alone(pipe, requests_):
    """Every candidate made on its own: the plain request with the candidate's seed."""
    return [[pipe.run(r.replace(rerank=1, seed=candidate_seed(r.seed, j))) for j in range(N)]
            for r in requests_]


def _image(w=64, h=64):
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), ((xx // 8 + yy // 8) % 2) * 200],
                   -1)
    return Image.fromarray(arr.astype(np.uint8))


def _mask(w=64, h=64):
    m = np.zeros((h, w), np.uint8)
    m[16:48, 20:52] = 255
    return Image.fromarray(m)


# --- seeds and text ---------------------------------------------------------------------------

def test_candidate_seeds_are_distinct_streams_and_candidate_0_is_the_image():
    for s in (0, 11, 2**32 - 5, 2**40 + 3):
        seeds = [candidate_seed(s, j) for j in range(MAX_RERANK)]
        assert seeds[0] == s and seeds[1] == (s + RERANK_SEED_STRIDE) % 2**32 + s // 2**32 * 2**32
        # torch's CPU generator reads the low 32 bits: those must differ, and differ from the
        # other images' seeds s + k of a call.
        low = {x % 2**32 for x in seeds}
        assert len(low) == MAX_RERANK
        assert not low & {(s + k) % 2**32 for k in range(1, 4096)}
        assert all(x // 2**32 == s // 2**32 for x in seeds)        # 32-bit seeds stay 32-bit
        noise = [torch.randn(4, generator=torch.Generator().manual_seed(x)) for x in seeds[:4]]
        assert all((noise[0] - n).abs().max() > 0.1 for n in noise[1:])


@pytest.mark.parametrize("prompt,text", [
    ("a (red:1.3) circle BREAK [green] background", "a red circle green background"),
    (r"a \(literal\) ((big)) cat", "a (literal) big cat"),
    ("two squares,BREAK  blue", "two squares, blue"),
    ("", ""),
])
def test_plain_text_drops_the_prompt_syntax(prompt, text):
    assert plain_text(prompt) == text


# --- the order and the candidates ------------------------------------------------------------

def test_order_equals_the_direct_similarities(reranked, alone, requests_, tiny_clip_model):
    """Candidates generated alone and scored directly by ClipModel.similarity against the
    prompt's words rank exactly as the rerank does; the best is the result's image."""
    assert len(reranked.images) == len(requests_) and len(reranked.candidates) == len(requests_)
    for k, r in enumerate(requests_):
        images = [a.images[0] for a in alone[k]]
        direct = tiny_clip_model.similarity(images, [plain_text(r.prompt)])[:, 0].tolist()
        gaps = sorted(direct)
        # The scores must be far enough apart for the order to mean something.
        assert min(b - a for a, b in zip(gaps, gaps[1:])) > 10 * SCORE_TOL
        cands = reranked.candidates[k]
        assert [c.index for c in cands] == sorted(range(N), key=lambda j: -direct[j])
        for c in cands:
            assert c.score == pytest.approx(direct[c.index], abs=SCORE_TOL)
        assert [c.score for c in cands] == sorted((c.score for c in cands), reverse=True)
        assert reranked.scores[k] == cands[0].score
        assert reranked.images[k] is cands[0].image
        assert torch.equal(reranked.pixels[k], cands[0].pixels)
        assert torch.equal(reranked.latents[k], cands[0].latents)
    # The words were scored, not the A1111 syntax (which CLIP would read as text).
    raw = tiny_clip_model.similarity([a.images[0] for a in alone[0]], [PROMPT])[:, 0]
    assert max(abs(float(raw[c.index]) - c.score) for c in reranked.candidates[0]) > SCORE_TOL


def test_candidate_j_is_the_plain_generation_with_its_seed(reranked, alone, requests_):
    for k, r in enumerate(requests_):
        for c in reranked.candidates[k]:
            plain = alone[k][c.index]
            assert c.seed == candidate_seed(r.seed, c.index) == plain.params[0].seed
            assert c.params == plain.params[0] and c.params.rerank == 1
            assert (c.pixels - plain.pixels[0]).abs().max() <= PIXEL_TOL
        # The candidates are different images (the seeds draw different noise).
        pixels = [c.pixels for c in reranked.candidates[k]]
        assert all((pixels[0] - p).abs().max() > 0.05 for p in pixels[1:])
    # The result's request is the image's own: its seed and rerank, the run's resolved fields.
    for k, r in enumerate(requests_):
        p = reranked.params[k]
        assert p.seed == r.seed and p.rerank == N
        assert p == reranked.candidates[k][0].params.replace(seed=r.seed, rerank=N)


def test_rerank_1_is_the_plain_call(pipe, alone):
    plain = pipe(PROMPT, seed=11, num_inference_steps=STEPS, progress=False)
    one = pipe.run(GenerationParams(prompt=PROMPT, seed=11, steps=STEPS, rerank=1))
    assert torch.equal(one.pixels, plain.pixels) and torch.equal(one.latents, plain.latents)
    assert one.candidates is None and one.scores is None and one.params == plain.params
    assert torch.equal(alone[0][0].pixels, plain.pixels)            # candidate 0's seed is 11


class Recorder(Observer):
    def __init__(self, cancel_at: tuple[int, int] | None = None):
        self.starts, self.ends, self.steps = [], 0, []
        self.cancel_at = cancel_at

    def on_start(self, passes):
        self.starts.append(passes)

    def on_step(self, progress):
        self.steps.append((progress.pass_index, progress.passes, progress.step, progress.total,
                           progress.latents.shape[0]))

    def cancelled(self):
        return self.cancel_at is not None and len(self.steps) == self.cancel_at[0] * STEPS + \
            self.cancel_at[1]

    def on_end(self):
        self.ends += 1


def _same(a, b):
    for ca, cb in zip(a.candidates, b.candidates):
        assert [c.seed for c in ca] == [c.seed for c in cb]
        for x, y in zip(ca, cb):
            assert x.score == pytest.approx(y.score, abs=SCORE_TOL)
            assert (x.pixels - y.pixels).abs().max() <= PIXEL_TOL
    assert a.params == b.params


def test_chunks_give_the_same_result_and_one_observed_run(pipe, requests_, reranked,
                                                          monkeypatch):
    """The 6 candidates in chunks of at most 4 (rerank_batch), then of 2 (what a memory check
    that refuses 3 images at once allows), a chunk never mixing the 2-window prompt with the
    1-window one: the same candidates, scores and choice; observers see one run whose passes
    are the chunks."""
    seen = Recorder()
    _same(pipe.run(requests_, rerank_batch=4, observer=seen), reranked)
    assert seen.starts == [2] and seen.ends == 1
    assert [s[:2] for s in seen.steps] == [(0, 2)] * STEPS + [(1, 2)] * STEPS
    assert [s[4] for s in seen.steps] == [3] * STEPS + [3] * STEPS

    real = pipe.check_generation_size

    def at_most_two(*, num_images, **kw):
        if num_images > 2:
            raise SizeLimitError(f"{num_images} images do not fit")
        return real(num_images=num_images, **kw)

    monkeypatch.setattr(pipe, "check_generation_size", at_most_two)
    seen = Recorder()
    _same(pipe.run(requests_, observer=seen), reranked)
    assert seen.starts == [4] and seen.ends == 1
    assert [s[0] for s in seen.steps] == [p for p in range(4) for _ in range(STEPS)]
    assert [s[4] for s in seen.steps[::STEPS]] == [2, 1, 2, 1]


def test_cancelling_a_later_chunk_ends_the_run_once(pipe, requests_):
    seen = Recorder(cancel_at=(1, 1))
    with pytest.raises(GenerationCancelled):
        pipe.run(requests_, rerank_batch=2, observer=seen)
    assert seen.starts == [4] and seen.ends == 1 and len(seen.steps) == STEPS + 1


# --- PNG and JSON ----------------------------------------------------------------------------

def test_png_records_the_request_and_the_choice(reranked, tmp_path):
    paths = reranked.save(tmp_path / "r.png")
    for k, path in enumerate(paths):
        text = read_png_text(path)
        best = reranked.candidates[k][0]
        assert f", Rerank: {N}, Rerank score: {best.score:.4f}, Rerank seed: {best.seed}," in text
        assert read_png_params(path) == reranked.params[k]          # Seed: the image's own
        choice = read_rerank_choice(text)
        assert choice.seed == best.seed and choice.score == pytest.approx(best.score, abs=5e-5)
    # A plain image's text is unchanged: no Rerank fields.
    plain = format_parameters(reranked.candidates[0][0].params)
    assert "Rerank" not in plain and read_rerank_choice(plain) is None


def test_the_png_request_replays_to_the_same_choice(pipe, reranked, tmp_path):
    """Image 1's prompt is one window long, image 0's two: in the call, image 1's candidates
    were still made unpadded, as alone, so its request re-played alone makes the same ones."""
    path = reranked.save(tmp_path / "r.png")[1]
    again = pipe.regenerate(read_png_params(path), progress=False)
    _same(again, GenerationResult(reranked.images[1:], reranked.pixels[1:], reranked.latents[1:],
                                  reranked.params[1:], reranked.candidates[1:]))


@pytest.mark.parametrize("field,message", [
    ("Rerank: 0", "Rerank must be between 1 and 64"),
    ("Rerank: 65", "Rerank must be between 1 and 64"),
    ("Rerank: two", "Rerank must be a whole number"),
])
def test_png_rerank_field_is_read_strictly(field, message):
    text = f"a cat\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x64, {field}"
    with pytest.raises(UserInputError, match=message):
        parse_parameters(text)


def test_png_choice_fields_are_read_strictly():
    head = "a cat\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x64, Rerank: 2"
    assert parse_parameters(head + ", Rerank score: 0.25, Rerank seed: 7").rerank == 2
    with pytest.raises(UserInputError, match="Rerank score must be a finite decimal"):
        read_rerank_choice(head + ", Rerank score: x, Rerank seed: 7")
    with pytest.raises(UserInputError, match="records both"):
        read_rerank_choice(head + ", Rerank seed: 7")


def test_json_round_trip_of_rerank():
    r = GenerationParams(prompt="a cat", rerank=5, seed=3)
    data = request_to_json(r)
    assert data["rerank"] == 5 and request_from_json(data) == r
    assert request_from_json({"prompt": "a", "rerank": 2.0}).rerank == 2
    for bad in (0, 65, True, "2", 2.5):
        with pytest.raises(UserInputError, match="rerank"):
            request_from_json({"prompt": "a", "rerank": bad})
    with pytest.raises(UserInputError, match="one sequence"):
        request_from_json({"mode": "interpolate", "prompt": "a", "rerank": 2})


# --- input errors, before compute ------------------------------------------------------------

@pytest.fixture
def trapped(pipe, trap):
    return trap(pipe)


def test_no_clip_is_one_line_before_compute(tiny_pipe, trap):
    assert tiny_pipe.clip is None
    with pytest.raises(UserInputError, match=r"^rerank needs a CLIP image encoder: tiny has no "
                                             r"image_encoder/; pass one with with_clip\(\.\.\.\) "
                                             r"/ --clip PATH$"):
        trap(tiny_pipe).run(GenerationParams(prompt="a", steps=STEPS, rerank=2))


def test_with_clip_gives_a_pipeline_its_clip(tiny_pipe, tiny_clip_dir, tiny_clip_model):
    by_path = tiny_pipe.with_clip(tiny_clip_dir)
    given = tiny_pipe.with_clip(tiny_clip_model)
    assert tiny_pipe.clip is None and given.clip is tiny_clip_model
    assert by_path.clip is not None and by_path.components is tiny_pipe.components
    with pytest.raises(UserInputError, match="with_clip takes a ClipModel or a path"):
        tiny_pipe.with_clip(3)
    result = given.run(GenerationParams(prompt="a cat", steps=STEPS, seed=4, rerank=2))
    assert len(result.candidates[0]) == 2


@pytest.mark.parametrize("changes,message", [
    (dict(rerank=0), "rerank must be a positive integer"),
    (dict(rerank=True), "rerank must be a positive integer"),
    (dict(rerank=2.0), "rerank must be a positive integer"),
    (dict(rerank=MAX_RERANK + 1), "more than 64 candidates"),
    (dict(rerank=2, steps=0), "steps must be a positive integer"),
    (dict(rerank=2, prompt="a\rb"), "carriage return"),
])
def test_bad_requests_before_compute(trapped, changes, message):
    request = GenerationParams(prompt="a", steps=STEPS).replace(**changes)
    with pytest.raises(UserInputError, match=message):
        trapped.run(request)


def test_bad_call_arguments_before_compute(trapped):
    r = GenerationParams(prompt="a", steps=STEPS, rerank=2)
    with pytest.raises(UserInputError, match="rerank_batch must be a positive integer"):
        trapped.run(r, rerank_batch=0)
    with pytest.raises(UserInputError, match="give a seed, not a generator"):
        trapped.run(r, generator=torch.Generator().manual_seed(1))
    with pytest.raises(UserInputError, match="may differ only in prompt"):
        trapped.run([r, r.replace(rerank=3)])
    # A later chunk's error is found before the first chunk runs.
    with pytest.raises(UserInputError, match="carriage return"):
        trapped.run([r, r.replace(prompt="b\rc")], rerank_batch=1)


def test_sequence_modes_refuse_rerank(trapped):
    image = _image()
    for request in (InterpolationParams(prompt="a", steps=STEPS, rerank=2),
                    EditParams(prompt="a", target_prompt="b", init_image=image, steps=STEPS,
                               rerank=2)):
        with pytest.raises(UserInputError, match="one sequence"):
            request.validate()
        with pytest.raises(UserInputError, match="one sequence"):
            trapped.run(request)


# --- the image modes -------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: ImageToImageParams(prompt="a red circle", init_image=_image(), strength=0.7,
                               steps=3, seed=7, rerank=3),
    lambda: InpaintParams(prompt="a red circle", init_image=_image(), mask=_mask(), steps=STEPS,
                          seed=7, rerank=3),
    lambda: VariationParams(prompt="a red circle", init_image=_image(), steps=STEPS, seed=7,
                            rerank=2),
], ids=["img2img", "inpaint", "vary"])
def test_image_modes_rerank(pipe, tiny_clip_model, make):
    """The candidates differ, rank by their direct similarity, and the best re-plays alone as a
    plain request with its seed."""
    request = make()
    result = pipe.run(request)
    cands = result.candidates[0]
    assert len(cands) == request.rerank and result.params[0].seed == request.seed
    assert all((cands[0].pixels - c.pixels).abs().max() > 1e-3 for c in cands[1:])
    direct = tiny_clip_model.similarity([c.image for c in cands], ["a red circle"])[:, 0]
    assert [c.score for c in cands] == pytest.approx(direct.tolist(), abs=SCORE_TOL)
    assert [c.score for c in cands] == sorted((c.score for c in cands), reverse=True)
    best = cands[0]
    alone = pipe.run(best.params)
    assert best.params.seed == candidate_seed(request.seed, best.index)
    assert (alone.pixels[0] - result.pixels[0]).abs().max() <= PIXEL_TOL


def test_the_diffusers_style_calls_take_rerank(pipe, tiny_clip_dir, reranked):
    """pipe(prompt, rerank=N) is the request with rerank N; the image modes' calls too."""
    from pipelines import ImageToImage

    called = pipe(PROMPT, seed=11, num_inference_steps=STEPS, rerank=N, rerank_batch=2,
                  progress=False)
    _same(called, GenerationResult(reranked.images[:1], reranked.pixels[:1],
                                   reranked.latents[:1], reranked.params[:1],
                                   reranked.candidates[:1]))
    img2img = ImageToImage(pipe.components, name=pipe.name, source=tiny_clip_dir)
    result = img2img("a red circle", _image(), strength=0.5, num_inference_steps=STEPS, seed=2,
                     rerank=2, rerank_batch=1, progress=False)
    assert [c.seed for c in sorted(result.candidates[0], key=lambda c: c.index)] == [
        2, candidate_seed(2, 1)]
