"""One pipeline shared by many threads: what generations share is read-only.

Sixteen concurrent generations (different prompts, seeds, step counts) on one fp16 and one bf16
pipeline must give exactly the images the same requests give one after another, with every
decode forced through the fp32 fallback, the path that used to re-cast the shared VAE in place.
"""

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pipelines import TextToImage

# (prompt, seed, steps): the tiny model at its native 64x64, 1 or 2 steps (fp16 on CPU is slow).
REQUESTS = [(f"a {colour} {shape}", 100 + k, 1 + k % 2)
            for k, (colour, shape) in enumerate(
                (c, s) for c in ("red", "blue", "green", "yellow")
                for s in ("circle", "square", "triangle", "star"))]


def _pipeline(tiny_dir, dtype: str) -> tuple[TextToImage, list]:
    """A pipeline whose every decode takes the fp32 path, and the list that records each one."""
    if dtype == "fp16":
        with pytest.warns(UserWarning, match="fp16 on the CPU"):
            pipe = TextToImage.from_folder(tiny_dir, dtype=dtype)
        # SD's VAE is marked force_upcast: in fp16 it always decodes in fp32.
        pipe.components.vae.register_to_config(force_upcast=True)
    else:
        pipe = TextToImage.from_folder(tiny_dir, dtype=dtype)
        # bf16 has fp32's range, so make the reduced-precision decode come out non-finite the
        # way an overflow would, and let decode's own check send it to the fp32 redo.
        fast = pipe._vae_decode

        def overflowing(z):
            out = fast(z).clone()
            out[:, :, 0, 0] = float("inf")
            return out
        pipe._vae_decode = overflowing
    fp32_decodes = []
    redo = pipe._decode_fp32

    def counted(z):
        fp32_decodes.append(z.shape[0])       # list.append is atomic: safe from many threads
        return redo(z)
    pipe._decode_fp32 = counted
    return pipe, fp32_decodes


def _generate(pipe: TextToImage, request, start: threading.Barrier | None = None):
    prompt, seed, steps = request
    if start is not None:
        start.wait()                          # all threads enter the pipeline together
    return pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, seed=seed,
                progress=False)


def _vae_state(pipe: TextToImage) -> dict:
    return {k: (v.dtype, v.data_ptr(), v.clone()) for k, v in
            pipe.components.vae.state_dict().items()}


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_concurrent_generations_equal_serial_ones(tiny_dir, dtype):
    pipe, fp32_decodes = _pipeline(tiny_dir, dtype)
    before = _vae_state(pipe)
    serial = [_generate(pipe, r) for r in REQUESTS]
    assert len(fp32_decodes) == len(REQUESTS)        # the fallback really ran, once per image
    start = threading.Barrier(len(REQUESTS))
    with ThreadPoolExecutor(max_workers=len(REQUESTS)) as pool:
        futures = [pool.submit(_generate, pipe, r, start) for r in REQUESTS]
        concurrent = [f.result() for f in futures]   # re-raises any thread's error
    assert len(fp32_decodes) == 2 * len(REQUESTS)
    for r, a, b in zip(REQUESTS, serial, concurrent):
        # Bitwise: the same kernels on the same inputs, whichever thread runs them.
        assert torch.equal(a.latents, b.latents), r
        assert torch.equal(a.pixels, b.pixels), r
        assert torch.isfinite(a.pixels).all()
    # The shared VAE was never re-cast or re-allocated: same dtype, same storage, same values.
    after = _vae_state(pipe)
    assert before.keys() == after.keys()
    for k, (dt, ptr, value) in before.items():
        assert after[k][0] == dt == pipe.dtype and after[k][1] == ptr, k
        assert torch.equal(after[k][2], value), k


def test_fp32_redo_equals_a_float32_vae(tiny_dir):
    """The fp32 copy decodes exactly as the VAE cast to fp32 (bf16 -> fp32 is exact)."""
    pipe, fp32_decodes = _pipeline(tiny_dir, "bf16")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = pipe.decode(latents)
    assert fp32_decodes == [2]
    vae = pipe.components.vae
    reference = torch.nn.Module.float(copy.deepcopy(vae)).decode(
        latents / vae.config.scaling_factor)
    assert torch.equal(images, (reference.sample.float() / 2 + 0.5).clamp(0, 1))
    assert vae.dtype == torch.bfloat16
    # The copy holds only what decoding reads, all fp32, and is made once.
    copy32 = pipe._fp32_vae()
    assert copy32 is pipe._fp32_vae() and copy32.encoder is None
    assert {p.dtype for p in copy32.parameters()} == {torch.float32}
    assert _count(copy32) == _count(vae) - _count(vae.encoder)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
