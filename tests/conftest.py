import os
import signal

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm_engine.components import build_random, save_model  # noqa: E402
from ldm_engine.configs import TINY  # noqa: E402


@pytest.fixture(scope="session")
def tiny_components():
    return build_random(TINY, seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_components):
    """A tiny random SD-1.x-architecture model saved as a diffusers folder (read-only for tests)."""
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model(tiny_components, path)
    return path


@pytest.fixture(scope="module")
def tiny_pipe(tiny_dir):
    """Our TextToImage over the tiny folder (fp32, CPU)."""
    from pipelines import TextToImage
    return TextToImage.from_folder(tiny_dir)


def load_reference(pipeline_cls, path):
    """A diffusers pipeline class loaded from a local folder, no safety checker, no bar: the
    reference of the parity tests."""
    ref = pipeline_cls.from_pretrained(path, safety_checker=None, requires_safety_checker=False,
                                       local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def tiny_diffusers_pipe(tiny_dir):
    """diffusers' StableDiffusionPipeline over the same folder: the reference for parity tests."""
    from diffusers import StableDiffusionPipeline
    return load_reference(StableDiffusionPipeline, tiny_dir)


@pytest.fixture
def unet_calls(pipe, monkeypatch):
    """The latent (h, w) of every UNet call of the module's `pipe` (guidance batches cond and
    uncond into one call, so one call per step for the single-call samplers)."""
    calls = []
    unet = pipe.components.unet
    forward = unet.forward

    def counted(sample, *args, **kwargs):
        calls.append(tuple(sample.shape[-2:]))
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", counted)
    return calls


class Trapped(AssertionError):
    """A network ran where a test expects the input to be refused before any compute."""


@pytest.fixture
def trap(monkeypatch):
    """trap(pipe) -> pipe with every network raising Trapped if called (UNet, text encoder,
    VAE encode and decode), for tests that bad input is reported before any compute."""
    def apply(pipe):
        def trapped(*args, **kwargs):
            raise Trapped("a network ran before the bad input was reported")

        c = pipe.components
        for net in (c.unet, c.text_encoder):
            monkeypatch.setattr(net, "forward", trapped)
        monkeypatch.setattr(c.vae, "encode", trapped)
        monkeypatch.setattr(c.vae, "decode", trapped)
        return pipe

    return apply


@pytest.fixture
def no_compute(monkeypatch):
    """For CLI tests: every network class raises Trapped if run, and model loads are counted
    (the returned dict's "load"), so a test can show bad input was refused before the weights
    were even read."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    import pipelines.base

    calls = {"load": 0}

    def trapped(*args, **kwargs):
        raise Trapped("a network ran before the bad input was reported")

    monkeypatch.setattr(UNet2DConditionModel, "forward", trapped)
    monkeypatch.setattr(AutoencoderKL, "encode", trapped)
    monkeypatch.setattr(AutoencoderKL, "decode", trapped)
    monkeypatch.setattr(CLIPTextModel, "forward", trapped)
    real = pipelines.base.load_model

    def counting_load(*args, **kwargs):
        calls["load"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pipelines.base, "load_model", counting_load)
    return calls


@pytest.fixture
def deadline(request):
    """A hang is a failure: SIGALRM interrupts a test that runs past its module's
    DEADLINE_SECONDS (default 20). Use with `pytestmark = pytest.mark.usefixtures("deadline")`."""
    seconds = getattr(request.module, "DEADLINE_SECONDS", 20)

    def expire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- CLIP (issue 12): a tiny random CLIP whose text tower is the tiny model's text encoder ---

TINY_CLIP_IMAGE_SIZE = 64          # the tiny model's native pixel size (8 latents x VAE factor 8)


@pytest.fixture(scope="session")
def tiny_clip():
    """A random tiny transformers CLIPModel (fp32, CPU, eval): text tower configured exactly as
    the tiny_components text encoder (TINY.text_encoder), vision tower ViT 64 px / patch 16,
    width 32, 2 layers, projection 32."""
    from transformers import CLIPConfig, CLIPModel

    text = TINY.text_encoder.to_transformers()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=TINY_CLIP_IMAGE_SIZE, patch_size=16,
                  projection_dim=TINY.text_encoder.projection_dim)
    torch.manual_seed(12)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision,
                                 projection_dim=TINY.text_encoder.projection_dim))
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, tiny_dir, tiny_clip):
    """tiny_dir's folder with tiny_clip's towers (image_encoder/, feature_extractor/ for pixels
    in [-1, 1], text_projection/) and its text tower as text_encoder/, so the UNet reads the
    CLIP's own text encoder, as in the bundled model. Read-only for tests."""
    import shutil

    from transformers import CLIPTextModel

    from ldm_engine.clip import save_clip_towers
    from ldm_engine.components import save_text_encoder

    path = tmp_path_factory.mktemp("models") / "tiny-clip"
    shutil.copytree(tiny_dir, path)
    text = CLIPTextModel(tiny_clip.config.text_config)
    text.load_state_dict(tiny_clip.text_model.state_dict())
    shutil.rmtree(path / "text_encoder")
    save_text_encoder(text, path / "text_encoder")
    save_clip_towers(tiny_clip, path, image_size=TINY_CLIP_IMAGE_SIZE,
                     image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    return path


@pytest.fixture(scope="session")
def tiny_clip_model(tiny_clip_dir):
    """ldm_engine.clip.ClipModel loaded from tiny_clip_dir (fp32, CPU)."""
    from ldm_engine.clip import load_clip
    return load_clip(tiny_clip_dir)
