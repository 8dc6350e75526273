"""Eight concurrent generations with different samplers and step counts on one pipeline equal the
same generations run alone, bit for bit.

The samplers cover every kind of state a generation holds: none (ddim, euler), a history carry
(dpmpp_2m_karras, lms, unipc), two model calls per step (heun), noise draws per step (euler_a,
dpmpp_sde's two, lcm's re-noising) and a diffusers scheduler copied per generation. Sharing
anything mutable between them (a plan, a carry, a scheduler, a generator) would show as a
difference. The tiny model at 32x32 keeps this to a few seconds.
"""

from __future__ import annotations

import threading

import pytest
import torch

from pipelines import TextToImage

REQUESTS = [  # (sampler, steps, seed, prompt)
    ("ddim", 3, 1, "a red circle"),
    ("euler_a", 4, 2, "a blue square"),
    ("dpmpp_2m_karras", 5, 3, "a green triangle"),
    ("unipc", 4, 4, "a yellow star"),
    ("heun", 2, 5, "a red square"),
    ("dpmpp_sde_karras", 3, 6, "a blue circle"),
    ("lcm", 4, 7, "a green star"),
    ("diffusers:DPMSolverMultistepScheduler", 3, 8, "a yellow triangle"),
]


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return TextToImage.from_folder(tiny_dir)


def _generate(pipe, request):
    sampler, steps, seed, prompt = request
    return pipe(prompt, sampler=sampler, num_inference_steps=steps, guidance_scale=5.0,
                seed=seed, height=32, width=32, progress=False)


def test_concurrent_generations_equal_the_same_ones_alone(pipe):
    alone = [_generate(pipe, r) for r in REQUESTS]
    together = [None] * len(REQUESTS)
    errors = []
    start = threading.Barrier(len(REQUESTS))

    def work(k):
        try:
            start.wait()                      # all enter the pipeline at once
            together[k] = _generate(pipe, REQUESTS[k])
        except BaseException as e:            # reported below, not lost in the thread
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for request, a, b in zip(REQUESTS, alone, together):
        assert torch.equal(a.latents, b.latents), request
        assert a.params == b.params
        assert a.params[0].sampler == request[0]
    # Different samplers give different images: the comparison is not vacuous.
    assert len({tuple(a.latents.flatten()[:8].tolist()) for a in alone}) == len(REQUESTS)
