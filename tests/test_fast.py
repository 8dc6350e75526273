"""The fast path: dtype/device choice, fp32 latents around a bf16/fp16 network, the VAE overflow
guard, AOT compilation and its cache, and the opt-in approximations (deep cache, VAE tiling)."""

import logging
import math

import pytest
import torch

from ldm_engine import compiled, precision
from ldm_engine.apps.cli import main
from ldm_engine.compiled import AOTCompiled, weights_fingerprint
from ldm_engine.components import load_model
from ldm_engine.configs import TINY
from ldm_engine.errors import NonFiniteError, UserInputError
from pipelines import TextToImage
from pipelines.deepcache import DeepCache, deep, head, tail
from pipelines.speed import SpeedOptions

PROMPT = "a red circle on the left"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def generate(pipe, **kw):
    return pipe(PROMPT, num_inference_steps=kw.pop("steps", 4), seed=0, progress=False, **kw)


@pytest.fixture(scope="module")
def exact(tiny_dir):
    return generate(TextToImage.from_folder(tiny_dir))


# --- choosing device and dtype ---------------------------------------------------------------

def test_auto_dtype_follows_the_hardware(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.resolve_dtype("auto", cuda) == torch.float16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_dtype("auto", cpu) == torch.float32
    assert precision.resolve_dtype("bf16", cpu) == torch.bfloat16
    assert precision.resolve_dtype(torch.float32, cpu) == torch.float32


def test_native_bf16_detection_reads_the_cpu_flags():
    flags = open("/proc/cpuinfo").read()
    assert precision.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize("call, message", [
    (lambda: precision.resolve_dtype("fp8", torch.device("cpu")), "unknown dtype 'fp8'"),
    (lambda: precision.resolve_dtype(torch.int8, torch.device("cpu")), "unsupported dtype"),
    (lambda: precision.resolve_device("tpu"), "unknown device 'tpu'"),
])
def test_bad_device_or_dtype(call, message):
    with pytest.raises(UserInputError, match=message):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_dir, tmp_path, capsys):
    with pytest.raises(UserInputError, match="no CUDA GPU"):
        precision.resolve_device("cuda")
    assert main(["generate", "x", "--model", str(tiny_dir), "--device", "cuda",
                 "--out", str(tmp_path / "a.png")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_fp16_on_cpu_warns():
    with pytest.warns(UserWarning, match="fp16 on the CPU"):
        precision.resolve_dtype("fp16", torch.device("cpu"))


# --- loading -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, channels_last", [(None, False), (torch.bfloat16, True),
                                                  (torch.float16, False)])
def test_read_safetensors_equals_the_reference_reader(tiny_dir, dtype, channels_last):
    import safetensors.torch

    from ldm_engine.formats import read_safetensors

    file = tiny_dir / "unet" / "diffusion_pytorch_model.safetensors"
    reference = safetensors.torch.load_file(str(file))
    ours = read_safetensors(file, dtype, channels_last=channels_last)
    assert ours.keys() == reference.keys()
    for name, ref in reference.items():
        want = ref.to(dtype) if dtype is not None and ref.is_floating_point() else ref
        assert ours[name].dtype == want.dtype and torch.equal(ours[name], want), name
        if ref.dim() == 4:
            assert ours[name].is_contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert ours[name].data_ptr() % 64 == 0


def test_read_safetensors_reports_truncation(tiny_dir, tmp_path):
    from ldm_engine.errors import ModelFolderError
    from ldm_engine.formats import read_safetensors

    data = (tiny_dir / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    with pytest.raises(ModelFolderError, match="cut.safetensors"):
        read_safetensors(cut)


def test_lean_load_equals_diffusers_from_pretrained(tiny_dir):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    ours = load_model(tiny_dir, dtype=torch.bfloat16, channels_last=True)
    for net, cls, sub in ((ours.unet, UNet2DConditionModel, "unet"),
                          (ours.vae, AutoencoderKL, "vae")):
        ref = cls.from_pretrained(tiny_dir / sub, torch_dtype=torch.bfloat16).state_dict()
        got = net.state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
        assert not net.training


def test_importing_the_engine_asks_for_huge_pages():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    code = "import pipelines, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "1"
    env["THP_MEM_ALLOC_ENABLE"] = "0"                      # a user's own choice is kept
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "0"


# --- reduced precision, done carefully -------------------------------------------------------

def test_fp32_path_is_untouched(tiny_dir, exact, tiny_components):
    """The default load uses the networks exactly as the plain pipeline does: same pixels."""
    from pipelines.base import Pipeline

    pipe = TextToImage.from_folder(tiny_dir, dtype="fp32")
    assert pipe.accelerated.memory_format == torch.contiguous_format
    plain = TextToImage(load_model(tiny_dir))
    assert isinstance(plain, Pipeline) and plain.accelerated is None
    assert torch.equal(generate(pipe).pixels, exact.pixels)
    assert torch.equal(generate(plain).pixels, exact.pixels)


def test_bf16_keeps_latents_fp32_and_stays_close(tiny_dir, exact):
    pipe = TextToImage.from_folder(tiny_dir, dtype="bf16")
    assert pipe.dtype == torch.bfloat16
    conv = pipe.components.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    out = generate(pipe)
    assert out.latents.dtype == torch.float32
    assert 30 < psnr(out.pixels, exact.pixels) < math.inf


def _overflowing_vae(pipe, force_upcast: bool):
    """Scale the decoder's input conv so its activations pass fp16's 65504 (but not fp32's)."""
    vae = pipe.components.vae
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(3e4)
    vae.register_to_config(force_upcast=force_upcast)
    return vae


@pytest.mark.parametrize("force_upcast", [True, False])
def test_fp16_vae_overflow_never_reaches_the_user(tiny_dir, force_upcast, caplog):
    with pytest.warns(UserWarning, match="fp16 on the CPU"):
        pipe = TextToImage.from_folder(tiny_dir, dtype="fp16")
    vae = _overflowing_vae(pipe, force_upcast)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    naive = vae.decode(latents.half() / vae.config.scaling_factor).sample
    assert not torch.isfinite(naive).all()        # the guard has something to guard against
    with caplog.at_level(logging.WARNING, logger="ldm_engine.pipelines"):
        images = pipe.decode(latents)
    assert torch.isfinite(images).all()
    assert ("overflowed" in caplog.text) == (not force_upcast)   # force_upcast never tries fp16
    assert vae.dtype == torch.float16                           # cast back after the fp32 decode
    reference = vae.float().decode(latents / vae.config.scaling_factor).sample
    assert torch.allclose(images, (reference / 2 + 0.5).clamp(0, 1), atol=1e-5)


def test_non_finite_latents_are_an_error_not_a_black_image(tiny_dir):
    pipe = TextToImage.from_folder(tiny_dir)
    with pytest.raises(NonFiniteError, match="inf/NaN latents"):
        pipe.decode(torch.full((1, 4, 8, 8), float("nan")))


# --- deep cache (approximate) ----------------------------------------------------------------

@pytest.mark.parametrize("hw", [(8, 8), (12, 20)])   # 12x20 needs explicit upsample sizes
def test_split_unet_equals_the_networks_forward(tiny_components, hw):
    unet = tiny_components.unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *hw, generator=g)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(321)
    with torch.no_grad():
        reference = unet(x, t, encoder_hidden_states=states).sample
        emb, *skips = head(unet, x, t, states)
        feature = deep(unet, emb, states, *skips)
        first = len(unet.up_blocks[-1].resnets)
        assert torch.equal(tail(unet, feature, emb, states, *skips[:first]), reference)
        # A reused step on the same input is exact too: only a *changed* input makes it approximate.
        cache = DeepCache(unet, 3)
        outs = [cache(x, t, states) for _ in range(4)]
    assert all(torch.equal(o, reference) for o in outs)
    assert cache.full_calls == 2 and cache.calls == 4            # calls 0 and 3 run the deep part


def test_deep_cache_is_opt_in_and_approximate(tiny_dir, exact):
    assert SpeedOptions().deep_cache == 1 and not SpeedOptions().approximate
    out = generate(TextToImage.from_folder(tiny_dir, deep_cache=3), steps=6)
    reference = generate(TextToImage.from_folder(tiny_dir), steps=6)
    assert torch.isfinite(out.pixels).all()
    assert 15 < psnr(out.pixels, reference.pixels) < math.inf
    # interval 1 is the exact network
    assert torch.equal(generate(TextToImage.from_folder(tiny_dir, deep_cache=1)).pixels,
                       exact.pixels)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_deep_cache_interval(bad):
    with pytest.raises(UserInputError, match="deep_cache"):
        SpeedOptions(deep_cache=bad)


def test_deep_cache_refuses_unet_it_cannot_split(tiny_components):
    import copy

    unet = copy.deepcopy(tiny_components.unet)
    unet.class_embedding = torch.nn.Embedding(2, 8)
    with pytest.raises(UserInputError, match="class embeddings"):
        DeepCache(unet, 2)


def test_vae_tiling_decodes_large_images_in_tiles(tiny_dir):
    size = 2 * TINY.vae.sample_size + 32     # well above the tile size, not a multiple of it
    exact = generate(TextToImage.from_folder(tiny_dir), height=size, width=size, steps=2)
    pipe = TextToImage.from_folder(tiny_dir, vae_tiling=True)
    assert pipe.components.vae.use_tiling
    tiled = generate(pipe, height=size, width=size, steps=2)
    assert tiled.pixels.shape == exact.pixels.shape
    assert torch.equal(tiled.latents, exact.latents)            # only the decode differs
    assert 20 < psnr(tiled.pixels, exact.pixels) < math.inf


# --- AOT compilation and its cache -----------------------------------------------------------

class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)))


def _call(net, x):
    return net(x)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "compiled"


def test_compiled_matches_eager_and_is_cached_per_shape(cache, caplog):
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(2, 4, 8, 8)
    fast = AOTCompiled(net, _call, name="net")
    with caplog.at_level(logging.WARNING, logger="ldm_engine.compiled"):
        out = fast(x)
        fast(x)
        assert fast.compiles == 1 and caplog.text.count("compiling net") == 1
        assert torch.allclose(out, net(x), atol=1e-5)
        fast(torch.randn(3, 4, 8, 8))          # a new shape: one announced compile, not silent
    assert fast.compiles == 2 and caplog.text.count("compiling net") == 2
    assert len(list(cache.glob("net-*.pt2"))) == 2
    # A new process (here: a new object) loads the packages instead of compiling.
    again = AOTCompiled(net, _call, name="net")
    assert torch.allclose(again(x), out) and again.compiles == 0


def test_changed_weights_never_reuse_a_stale_package(cache):
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(2, 4, 8, 8)
    AOTCompiled(net, _call, name="net")(x)
    before = weights_fingerprint(net)
    with torch.no_grad():
        net.lin.weight[3, 5] += 0.5        # e.g. a merged LoRA: one weight moved
    assert weights_fingerprint(net) != before
    fresh = AOTCompiled(net, _call, name="net")
    assert torch.allclose(fresh(x), net(x), atol=1e-5) and fresh.compiles == 1


def test_damaged_package_is_rebuilt(cache, caplog):
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(2, 4, 8, 8)
    AOTCompiled(net, _call, name="net")(x)
    [package] = cache.glob("net-*.pt2")
    package.write_bytes(package.read_bytes()[:1000])
    fresh = AOTCompiled(net, _call, name="net")
    with caplog.at_level(logging.WARNING, logger="ldm_engine.compiled"):
        assert torch.allclose(fresh(x), net(x), atol=1e-5)
    assert fresh.compiles == 1 and "does not load" in caplog.text


def test_compiled_pipeline_matches_eager_and_restarts_from_cache(tiny_dir, cache):
    eager = generate(TextToImage.from_folder(tiny_dir, dtype="bf16"))
    pipe = TextToImage.from_folder(tiny_dir, dtype="bf16", compile=True)
    out = generate(pipe)
    assert pipe.accelerated.compiles == 1            # the UNet (the VAE decoder only on CUDA)
    assert psnr(out.pixels, eager.pixels) > 35
    restarted = TextToImage.from_folder(tiny_dir, dtype="bf16", compile=True)
    assert torch.equal(generate(restarted).pixels, out.pixels)
    assert restarted.accelerated.compiles == 0


def test_compiled_pipeline_drops_eager_unet_weights_and_reads_them_back(tiny_dir, cache):
    """While packages stand in for the UNet its eager weights are not kept; a new shape re-reads
    them from the file to compile, and weights edited in place are refused, not silently lost."""
    pipe = TextToImage.from_folder(tiny_dir, dtype="bf16", compile=True)
    unet = pipe.components.unet
    generate(pipe)
    assert all(p.numel() == 0 for p in unet.parameters())
    eager = TextToImage.from_folder(tiny_dir, dtype="bf16")
    bigger = generate(pipe, height=80, width=80)              # a new shape: compile from re-read
    assert pipe.accelerated.compiles >= 1 and all(p.numel() == 0 for p in unet.parameters())
    assert psnr(bigger.pixels, generate(eager, height=80, width=80).pixels) > 35
    edited = TextToImage.from_folder(tiny_dir, dtype="bf16", compile=True)
    with torch.no_grad():
        edited.components.unet.conv_out.bias.add_(0.1)
    with pytest.raises(UserInputError, match="changed after the pipeline was built"):
        generate(edited)                                       # package cached: before loading it
    packages = sorted(cache.glob("unet-*.pt2"))
    with pytest.raises(UserInputError, match="changed after the pipeline was built"):
        generate(edited, height=72, width=72)                  # no package: before compiling
    assert sorted(cache.glob("unet-*.pt2")) == packages        # nothing filed under a stale key


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LDM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compiled.cache_dir() == tmp_path / "ldm-engine" / "compiled"
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "x"))
    assert compiled.cache_dir() == tmp_path / "x" / "compiled"


# --- CLI -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp8"], "invalid choice"),
    (["--deep-cache", "0"], "deep_cache must be an integer >= 1"),
    (["--attention", "xformers"], "xformers"),
])
def test_cli_speed_flags_are_checked(tiny_dir, tmp_path, capsys, args, message):
    argv = ["generate", "x", "--model", str(tiny_dir), "--out", str(tmp_path / "a.png"), *args]
    try:
        code = main(argv)
    except SystemExit as e:          # argparse's own choices check
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_cli_dtype_choice_is_used(tiny_dir, tmp_path, exact):
    from pipelines import read_png_params

    out = tmp_path / "a.png"
    assert main(["generate", PROMPT, "--model", str(tiny_dir), "--out", str(out), "--seed", "0",
                 "--steps", "4", "--guidance", "7.5", "--dtype", "fp32", "--quiet"]) == 0
    import numpy as np
    from PIL import Image

    pixels = torch.from_numpy(np.array(Image.open(out))).permute(2, 0, 1).float() / 255
    assert (pixels - exact.pixels[0]).abs().max() <= 1 / 255 + 1e-6
    assert read_png_params(out).seed == 0


# --- CUDA (skipped without a GPU) ------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_auto_is_fp16_and_finite(tiny_dir, exact):
    pipe = TextToImage.from_folder(tiny_dir, device="auto", dtype="auto")
    assert pipe.device.type == "cuda" and pipe.dtype == torch.float16
    out = generate(pipe)
    assert torch.isfinite(out.pixels).all() and psnr(out.pixels, exact.pixels) > 30


@pytest.mark.gpu
def test_cuda_compiled_matches_eager(tiny_dir, cache):
    eager = generate(TextToImage.from_folder(tiny_dir, device="cuda", dtype="fp16"))
    out = generate(TextToImage.from_folder(tiny_dir, device="cuda", dtype="fp16", compile=True))
    assert psnr(out.pixels, eager.pixels) > 35
