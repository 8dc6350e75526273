"""Observers (pipelines.observe) watch a run without changing it: the call sequence, progress
bars, cancellation within one step, previews of the x0 estimate; and the pipeline registry."""

import dataclasses
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines.observe
from ldm_engine.errors import GenerationCancelled, UserInputError
from pipelines import (PIPELINES, CancelToken, GenerationParams, HiresFix, ImageToImage,
                       ImageToImageParams, Observer, Previews, TextToImage, get_pipeline)
from pipelines.registry import mode_of

PROMPT = "a red circle on the left"
RUN = dict(num_inference_steps=4, guidance_scale=7.5, seed=3, progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


class Recorder(Observer):
    def __init__(self, fail_at: int | None = None):
        self.events, self.fail_at = [], fail_at

    def on_start(self, passes):
        self.events.append(("start", passes))

    def on_step(self, progress):
        self.events.append(("step", progress.pass_index, progress.step, progress.total,
                            progress.passes))
        assert progress.latents.shape == progress.denoised.shape
        if progress.step == self.fail_at:
            raise RuntimeError("observer failed")

    def on_end(self):
        self.events.append(("end",))


def _steps(pass_index, total, passes, upto=None):
    """The on_step events of steps 1..upto (default: all) of a `total`-step pass."""
    return [("step", pass_index, k, total, passes) for k in range(1, (upto or total) + 1)]


# --- the call sequence -------------------------------------------------------------------------

def test_observer_sequence_one_pass(pipe):
    seen = Recorder()
    pipe(PROMPT, observer=seen, **RUN)
    assert seen.events == [("start", 1), *_steps(0, 4, 1), ("end",)]


def test_observer_sequence_with_hires_fix(pipe):
    seen = Recorder()
    # Pass 2: a 6-step plan at strength 0.5 runs its last 3 steps.
    pipe(PROMPT, observer=seen, hires=HiresFix(scale=1.5, steps=6, strength=0.5), **RUN)
    assert seen.events == [("start", 2), *_steps(0, 4, 2), *_steps(1, 3, 2), ("end",)]


def test_several_observers_each_see_everything(pipe):
    a, b = Recorder(), Recorder()
    pipe(PROMPT, observer=[a, b], **RUN)
    assert a.events == b.events == [("start", 1), *_steps(0, 4, 1), ("end",)]


def test_on_end_even_when_an_observer_fails(pipe):
    seen = Recorder(fail_at=2)
    with pytest.raises(RuntimeError, match="observer failed"):
        pipe(PROMPT, observer=seen, **RUN)
    assert seen.events == [("start", 1), *_steps(0, 4, 1, upto=2), ("end",)]


def test_on_end_even_when_the_network_fails(pipe, monkeypatch):
    calls = []
    forward = pipe.components.unet.forward

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.components.unet, "forward", failing)
    seen = Recorder()
    with pytest.raises(RuntimeError, match="simulated"):
        pipe(PROMPT, observer=seen, **RUN)
    assert seen.events == [("start", 1), *_steps(0, 4, 1, upto=2), ("end",)]


def test_not_an_observer_is_refused():
    with pytest.raises(UserInputError, match="observer must be a pipelines.observe.Observer"):
        pipelines.observe.as_observers([Recorder(), print])


class FakeBar:
    made = []

    def __init__(self, total, desc, leave):
        self.total, self.desc, self.n, self.closed = total, desc, 0, False
        FakeBar.made.append(self)

    def update(self, k):
        self.n += k

    def close(self):
        self.closed = True


def test_progress_bar_one_bar_per_pass(pipe, monkeypatch):
    FakeBar.made = []
    monkeypatch.setattr(pipelines.observe, "tqdm", FakeBar)
    pipe(PROMPT, hires=HiresFix(scale=1.5, steps=6, strength=0.5),
         **(RUN | {"progress": True}))
    assert [(b.desc, b.total, b.n, b.closed) for b in FakeBar.made] == [
        ("ddim pass 1", 4, 4, True), ("ddim pass 2", 3, 3, True)]


def test_progress_bar_closed_on_error(pipe, monkeypatch):
    FakeBar.made = []
    monkeypatch.setattr(pipelines.observe, "tqdm", FakeBar)
    with pytest.raises(RuntimeError):
        pipe(PROMPT, observer=Recorder(fail_at=2), **(RUN | {"progress": True}))
    # The bar comes after the caller's observers, so step 2's failure came before its update.
    assert [(b.desc, b.total, b.n, b.closed) for b in FakeBar.made] == [("ddim", 4, 1, True)]


# --- cancellation ------------------------------------------------------------------------------

def test_cancel_from_another_thread_stops_within_one_step(pipe, monkeypatch):
    """A second thread cancels while step 2's UNet call is running; the run finishes that step
    and stops before step 3: two UNet calls in all, then GenerationCancelled."""
    token, seen = CancelToken(), Recorder()
    calls = []
    forward = pipe.components.unet.forward
    reached, cancelled = threading.Event(), threading.Event()

    def canceller():
        reached.wait(timeout=30)
        token.cancel()
        cancelled.set()

    def unet(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            reached.set()
            assert cancelled.wait(timeout=30)      # the other thread has cancelled by now
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.components.unet, "forward", unet)
    thread = threading.Thread(target=canceller)
    thread.start()
    try:
        with pytest.raises(GenerationCancelled, match="after 2 of 4 steps"):
            pipe(PROMPT, observer=[token, seen], **RUN)
    finally:
        thread.join(timeout=30)
    assert len(calls) == 2
    assert seen.events == [("start", 1), *_steps(0, 4, 1, upto=2), ("end",)]


def test_cancel_from_on_step(pipe, unet_calls):
    token = CancelToken()

    class CancelAt(Observer):
        def on_step(self, progress):
            if progress.step == 3:
                token.cancel()

    with pytest.raises(GenerationCancelled, match="after 3 of 4 steps"):
        pipe(PROMPT, observer=[CancelAt(), token], **RUN)
    assert len(unet_calls) == 3


def test_cancel_in_the_second_pass_names_it(pipe, unet_calls):
    token = CancelToken()

    class CancelInPass2(Observer):
        def on_step(self, progress):
            if progress.pass_index == 1 and progress.step == 1:
                token.cancel()

    with pytest.raises(GenerationCancelled, match=r"after 1 of 3 steps \(pass 2 of 2\)"):
        pipe(PROMPT, observer=[CancelInPass2(), token],
             hires=HiresFix(scale=1.5, steps=6, strength=0.5), **RUN)
    assert len(unet_calls) == 4 + 1


def test_cancelled_before_the_start_runs_no_step(pipe, unet_calls):
    token = CancelToken()
    token.cancel()
    with pytest.raises(GenerationCancelled, match="after 0 of 4 steps"):
        pipe(PROMPT, observer=token, **RUN)
    assert unet_calls == []


def test_a_cancelled_token_is_not_a_user_input_error():
    assert not issubclass(GenerationCancelled, UserInputError)


# --- previews ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exact_end_pipe(tiny_components):
    """The tiny model with alpha_bar_prev = 1 after the last DDIM step (set_alpha_to_one), so
    the last step returns its x0 estimate itself: x_prev = sqrt(1) x0 + sqrt(1 - 1) eps."""
    schedule = dataclasses.replace(tiny_components.schedule, set_alpha_to_one=True)
    return TextToImage(dataclasses.replace(tiny_components, schedule=schedule))


def test_previews_every_k_steps_and_the_last_equals_the_image(exact_end_pipe):
    got = []
    previews = Previews(lambda progress, images: got.append((progress.step, images)), every=2)
    res = exact_end_pipe(PROMPT, observer=previews, **(RUN | {"num_inference_steps": 5}))
    assert [step for step, _ in got] == [2, 4, 5]          # every 2nd step, and the last
    assert all(len(images) == 1 and images[0].size == (64, 64) for _, images in got)
    assert np.array_equal(np.asarray(got[-1][1][0]), np.asarray(res.images[0]))
    # Earlier previews are other estimates (x0 changes as sigma falls).
    assert not np.array_equal(np.asarray(got[0][1][0]), np.asarray(res.images[0]))


def test_preview_is_the_x0_estimate_not_the_noisy_latents(pipe):
    """With SD's schedule (alpha_bar_prev = alpha_bar_0 at the end) the last x0 estimate is not
    the final latent, but decodes close to it: |x - x0| = |(sqrt(a0) - 1) x0 +
    sqrt(1 - a0) eps| with 1 - a0 = 0.00085. At step 1 the latents are still noisy."""
    got = []

    class Keep(Observer):
        def on_step(self, progress):
            got.append((progress.latents.clone(), progress.denoised.clone(),
                        progress.preview()))

    res = pipe(PROMPT, observer=Keep(), **RUN)
    latents, x0, preview = got[-1]
    assert torch.equal(latents, res.latents)
    assert 0 < (x0 - res.latents).abs().max() < 0.1
    assert (pipe.decode(x0) - res.pixels).abs().max() < 0.02
    assert np.array_equal(np.asarray(preview[0]), np.asarray(pipe.to_pil(pipe.decode(x0))[0]))
    first_latents, first_x0, _ = got[0]
    assert (first_latents - first_x0).abs().max() > 0.1


def test_previews_refuse_a_bad_interval():
    with pytest.raises(ValueError, match="every must be a positive integer"):
        Previews(lambda p, i: None, every=0)


def test_observers_do_not_change_the_image(pipe):
    """Same latents, bit for bit, with and without observers: a stochastic sampler (its noise
    draws are unchanged) and a previewing observer (its decodes are side effects only)."""
    kw = RUN | {"sampler": "euler_a"}
    plain = pipe(PROMPT, **kw)
    watched = pipe(PROMPT, observer=[Recorder(), CancelToken(),
                                     Previews(lambda p, i: None, every=1)], **kw)
    assert torch.equal(plain.latents, watched.latents)
    assert torch.equal(plain.pixels, watched.pixels)


# --- run() and the registry --------------------------------------------------------------------

def test_run_refuses_mixed_request_types(pipe):
    image = Image.new("RGB", (64, 64), (100, 150, 200))
    requests = [GenerationParams(prompt="a", steps=2),
                ImageToImageParams(prompt="b", steps=2, init_image=image)]
    with pytest.raises(UserInputError, match="one batch runs one mode"):
        pipe.run(requests)


def test_run_refuses_requests_differing_beyond_prompts_and_seeds(pipe):
    requests = [GenerationParams(prompt="a", steps=2), GenerationParams(prompt="b", steps=3)]
    with pytest.raises(UserInputError, match="may differ only in prompt"):
        pipe.run(requests)


def test_run_refuses_what_is_not_a_request(pipe):
    with pytest.raises(UserInputError, match="run\\(\\) takes a request"):
        pipe.run(["a prompt"])
    with pytest.raises(UserInputError, match="run\\(\\) takes a request"):
        pipe.run([])


def test_any_pipeline_runs_any_registered_mode(pipe):
    """A TextToImage runs an image-to-image request with the same networks, and gets the image
    ImageToImage makes."""
    image = Image.new("RGB", (64, 64), (100, 150, 200))
    request = ImageToImageParams(prompt="b", steps=2, strength=0.5, init_image=image, seed=4)
    ours = pipe.run(request)
    theirs = ImageToImage(pipe.components).run(request)
    assert torch.equal(ours.pixels, theirs.pixels)
    assert type(ours.params[0]) is ImageToImageParams


def test_registry_names():
    assert get_pipeline("txt2img") is TextToImage
    assert get_pipeline("img2img") is ImageToImage
    for name, cls in PIPELINES.items():
        assert get_pipeline(name) is cls
        assert cls.MODE.name == name
        assert cls.MODE.request.mode == name        # each request type names its mode


@pytest.mark.parametrize("name", ["txt2vid", "", None, ["txt2img"]])
def test_unknown_pipeline_lists_the_valid_names(name):
    with pytest.raises(UserInputError, match="unknown pipeline") as info:
        get_pipeline(name)
    assert f"valid pipelines: {', '.join(PIPELINES)}" in str(info.value)
    assert "txt2img" in str(info.value) and "img2img" in str(info.value)


def test_mode_of_a_request():
    assert mode_of(GenerationParams(prompt="a")) is TextToImage.MODE
    assert mode_of(ImageToImageParams(prompt="a")) is ImageToImage.MODE


def test_inpaint_request_on_a_text_to_image_pipeline(pipe):
    if "inpaint" not in PIPELINES:
        pytest.skip("pipelines.registry has no inpaint mode yet")
    from pipelines import InpaintParams
    image = Image.new("RGB", (64, 64), (100, 150, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))               # repaint the centre square
    request = InpaintParams(prompt="a", steps=2, init_image=image, mask=mask, seed=1)
    res = pipe.run(request)
    assert res.images[0].size == (64, 64)
    assert type(res.params[0]) is InpaintParams
    assert res.params[0].mask_hash == request.mask_hash != ""
