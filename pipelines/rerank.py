"""Reranking: make N candidates of every image and keep the one CLIP finds closest to its prompt.

DALL-E (Ramesh et al. 2021, Sec. 2.5) sampled many images per caption and let a CLIP model
(Radford et al. 2021) rank them; DALL-E mini does the same. Here a request with ``rerank=N``
runs as N plain requests per image, candidate j (0-based) of the image whose seed is s made with
seed s + j * 2**24 (params.candidate_seed: added in the low 32 bits, the ones torch's CPU
generator reads), so

- rerank=1 is the plain call, and candidate 0 is the image the request makes without reranking;
- any candidate re-plays alone as a plain request with its seed (``Candidate.params``);
- the choice re-plays too: the request (its own seed s, rerank N) makes the same candidates.

Each candidate's score is the cosine similarity of CLIP's embeddings of the image (the 8-bit
image returned, as ``ldm clip-score`` would read its PNG) and of its prompt's words
(prompts.plain_text: the A1111 syntax removed; the negative prompt is not scored). The best
comes first; between equal scores the lower j (the earlier seed) wins.

The candidates are generated in chunks: the largest that passes the pipeline's size and memory
checks (check_generation_size), at most ``rerank_batch`` when given, and never mixing prompts
of different lengths in 75-token windows (see _chunks: so an image's candidates, and its
choice, do not depend on the other images of the call). Chunks are checked all before the
first runs, so bad input is still reported before any compute. Every chunk is a plain batch,
so candidate j equals its plain generation alone within the batch-vs-single tolerance of the
networks' batched arithmetic (exactly, with ``rerank_batch=1``).

Observers see one run: on_start once (with every chunk's passes counted: chunk c's pass k is
pass c * P + k of C * P), each chunk's steps (Progress.latents are that chunk's candidates'), and
on_end once. Sequence modes (interpolation frames, text-diff edits) refuse rerank > 1: their
images share one noise, and choosing among candidates frame by frame would break the sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ldm_engine.errors import UserInputError

from .base import GenerationResult
from .modes import Mode
from .observe import Observer, Progress, as_observers
from .params import GenerationParams, candidate_seed
from .prompts import plain_text, prompt_windows

if TYPE_CHECKING:
    from .base import Pipeline


@dataclass(frozen=True, eq=False)
class Candidate:
    """One candidate of a reranked image."""

    index: int                        # j: the candidate's place in seed order, 0 = the image's
    seed: int                         # candidate_seed(image seed, j)
    score: float                      # cosine of CLIP's image and prompt embeddings, in [-1, 1]
    image: Image.Image
    pixels: torch.Tensor              # (3, H, W) float32 in [0, 1]
    latents: torch.Tensor             # (C, h, w) final latents
    params: GenerationParams          # the plain request (rerank 1, this seed) that re-makes it


def run_reranked(pipe: "Pipeline", mode: Mode, images: list[GenerationParams], *,
                 generator=None, observer: Observer | Sequence[Observer] | None = None,
                 progress: bool = False, allow_large: bool = False,
                 rerank_batch: int | None = None) -> GenerationResult:
    """Pipeline.run for per-image requests with rerank > 1 (see the module docstring)."""
    first = images[0]
    n = first.rerank
    c = pipe.components
    first.check_mode(c.vae_factor)                   # sequence modes refuse rerank here
    if generator is not None:
        raise UserInputError("rerank makes candidate j from seed + j * 2**24: give a seed, "
                             "not a generator")
    clip = pipe.clip
    if clip is None:
        raise UserInputError(f"rerank needs a CLIP image encoder: {pipe.name or 'this model'} "
                             "has no image_encoder/; pass one with with_clip(...) / --clip PATH")
    # One size for every chunk: the one the whole batch would have (the first request's).
    height, width = mode.size(pipe, first)
    candidates = [r.replace(seed=candidate_seed(r.seed, j), rerank=1, height=height,
                            width=width)
                  for r in images for j in range(n)]             # image k's j: row k * n + j
    size = _chunk_size(pipe, mode, first, len(candidates), height, width, allow_large,
                       rerank_batch)
    batches = [pipe._batch(mode, chunk, None, allow_large)
               for chunk in _chunks(pipe, candidates, n, size)]

    texts = [plain_text(r.prompt) for r in images]
    unique = list(dict.fromkeys(texts))
    text_embeds = clip.text_embeds(unique)                        # (U, P), L2-normalised
    rows = torch.tensor([unique.index(t) for t in texts for _ in range(n)])
    observers = as_observers(observer)
    if progress:
        from .observe import ProgressBar
        observers.append(ProgressBar(batches[0].sampler.name))
    run = _OneRun(observers, len(batches))
    parts: list[GenerationResult] = []
    scores: list[torch.Tensor] = []
    try:
        done = 0
        for index, batch in enumerate(batches):
            part = pipe._generate(mode, batch, [run.chunk(index)] if observers else [])
            image_embeds = clip.image_embeds(part.images).to(text_embeds)   # (b, P)
            # Both unit vectors: the dot product is the cosine.
            wanted = text_embeds[rows[done:done + len(batch)].to(text_embeds.device)]
            scores.append((image_embeds * wanted).sum(-1).float().cpu())
            parts.append(part)
            done += len(batch)
    finally:
        run.end()
    return _result(images, n, parts, torch.cat(scores))


def _chunk_size(pipe: "Pipeline", mode: Mode, first: GenerationParams, total: int,
                height: int, width: int, allow_large: bool, most: int | None) -> int:
    """The most candidates one batch may hold: at most `most` and the total, and the largest
    the size and memory checks pass (the estimate grows with the batch: a bisection)."""
    out_h, out_w = mode.largest(pipe, first, height, width)

    def fits(k: int) -> bool:
        try:
            pipe.check_generation_size(height=out_h, width=out_w, num_images=k,
                                       guided=first.guidance_scale != 1.0,
                                       allow_large=allow_large)
        except UserInputError:
            return False
        return True

    low, high = 1, min(total, most or total)
    if not fits(low):
        # Not even one image fits: the check's own message says why (raised here).
        pipe.check_generation_size(height=out_h, width=out_w, num_images=1,
                                   guided=first.guidance_scale != 1.0, allow_large=allow_large)
    while low < high:                   # invariant: fits(low)
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def _chunks(pipe: "Pipeline", candidates: list[GenerationParams], n: int, size: int
            ) -> list[list[GenerationParams]]:
    """The candidates (image k's at rows k * n ...) in chunks of at most `size`, where one chunk
    only holds images whose prompts take the same number of 75-token windows.

    A batch pads every text to its longest text's windows (pipelines.prompts), and a prompt
    padded with an empty window conditions the UNet differently (its cross-attention sees the
    extra tokens). Chunks of equal window counts are never padded, so each candidate is made as
    its request alone would make it: the choice of an image does not depend on the other
    images of the call, and its PNG's request re-played alone makes the same choice.
    """
    c = pipe.components
    embeddings = getattr(pipe, "embeddings", ())

    def windows(r: GenerationParams) -> int:
        texts = [r.prompt] if r.guidance_scale == 1.0 else [r.prompt, r.negative_prompt]
        return max(len(prompt_windows(c.tokenizer, t, embeddings).ids) for t in texts)

    out: list[list[GenerationParams]] = []
    key = None
    for k in range(0, len(candidates), n):
        here = windows(candidates[k])
        if here != key:
            out.append([])
            key = here
        for r in candidates[k:k + n]:
            if len(out[-1]) == size:
                out.append([])
            out[-1].append(r)
    return out


def _result(images: list[GenerationParams], n: int, parts: list[GenerationResult],
            scores: torch.Tensor) -> GenerationResult:
    """Each image's candidates best first, and its best one as the result's image."""
    made = [p for part in parts for p in part.params]
    pil = [im for part in parts for im in part.images]
    pixels = torch.cat([part.pixels for part in parts])
    latents = torch.cat([part.latents for part in parts])
    ranked: list[list[Candidate]] = []
    for k in range(len(images)):
        mine = [Candidate(index=j, seed=made[k * n + j].seed, score=float(scores[k * n + j]),
                          image=pil[k * n + j], pixels=pixels[k * n + j],
                          latents=latents[k * n + j], params=made[k * n + j])
                for j in range(n)]
        # sorted is stable: among equal scores the lower j stays first.
        ranked.append(sorted(mine, key=lambda cand: -cand.score))
    best = [cands[0] for cands in ranked]
    # The image's own request (its seed, rerank n), as the chosen candidate was made.
    params = [dataclasses.replace(b.params, seed=r.seed, rerank=n) for b, r in zip(best, images)]
    return GenerationResult(images=[b.image for b in best],
                            pixels=torch.stack([b.pixels for b in best]),
                            latents=torch.stack([b.latents for b in best]),
                            params=params, candidates=ranked)


class _OneRun:
    """The run's observers, shown the chunks as one run: on_start when the first chunk starts
    (its passes times the chunks), each chunk's passes numbered after the chunks before it, and
    on_end once (only if the run started, as Pipeline.run does)."""

    def __init__(self, observers: list[Observer], chunks: int):
        self.observers, self.chunks = observers, chunks
        self.started = False

    def chunk(self, index: int) -> Observer:
        return _Chunk(self, index)

    def end(self) -> None:
        if self.started:
            for o in self.observers:
                o.on_end()


class _Chunk(Observer):
    def __init__(self, run: _OneRun, index: int):
        self.run, self.index = run, index
        self.passes = 1

    def on_start(self, passes: int) -> None:
        self.passes = passes
        if not self.run.started:
            self.run.started = True
            for o in self.run.observers:
                o.on_start(passes * self.run.chunks)

    def on_step(self, progress: Progress) -> None:
        seen = dataclasses.replace(progress,
                                   pass_index=self.index * self.passes + progress.pass_index,
                                   passes=self.passes * self.run.chunks)
        for o in self.run.observers:
            o.on_step(seen)

    def cancelled(self) -> bool:
        return any(o.cancelled() for o in self.run.observers)
