"""Watching a generation: progress, previews and cancellation, apart from the step hooks.

A step hook (pipelines.loop.StepHook) changes the latents (inpainting re-imposes the known
region); an observer only looks. After every step the loop hands each observer a Progress; before
every step it asks each whether the run is cancelled, and a cancelled run raises
GenerationCancelled at once (so it stops within one step). The progress bar is one observer; the
HTTP server's progress endpoint, live previews and its interrupt button are others.

Previews are the denoiser's current estimate of the clean image, x0 = D(x_t, sigma_t): early in a
run a blurry average, sharpening as sigma falls (the "progressively clearer images" of Ho et al.
2020, Fig. 6). Decoding costs a VAE pass, so it only happens when an observer asks for one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm


@dataclass(frozen=True, eq=False)
class Progress:
    """One finished step of one pass (hires fix runs two passes)."""

    step: int                         # steps done in this pass, 1..total
    total: int                        # steps in this pass
    pass_index: int                   # 0 for the first pass, 1 for the hires / second pass
    passes: int                       # how many passes the run has
    latents: torch.Tensor             # (B, C, h, w) x after the step
    denoised: torch.Tensor | None     # (B, C, h, w) the step's x0 estimate (None: not known)
    _decode: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)

    def preview(self) -> list[Image.Image]:
        """The current x0 estimate decoded to images (one VAE pass; the latents if no x0)."""
        from .base import Pipeline

        x0 = self.denoised if self.denoised is not None else self.latents
        return Pipeline.to_pil(self._decode(x0))


class Observer:
    """A generation's watcher; every method is a no-op here. Subclass what you need."""

    def on_start(self, passes: int) -> None:
        """Called once, before the first step."""

    def on_step(self, progress: Progress) -> None:
        """Called after each step. Must not change the tensors it is shown."""

    def cancelled(self) -> bool:
        """Asked before each step: True stops the run with GenerationCancelled."""
        return False

    def on_end(self) -> None:
        """Called once when the run ends, finished, failed or cancelled."""


class ProgressBar(Observer):
    """The tqdm bar of `TextToImage(..., progress=True)`, one bar per pass."""

    def __init__(self, desc: str = "") -> None:
        self.desc = desc
        self._bar = None

    def on_step(self, progress: Progress) -> None:
        if self._bar is None or progress.step == 1:
            self._close()
            label = self.desc if progress.passes == 1 else f"{self.desc} pass {progress.pass_index + 1}"
            self._bar = tqdm(total=progress.total, desc=label, leave=False)
        self._bar.update(1)

    def on_end(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class CancelToken(Observer):
    """Cancels a run from any thread: ``token = CancelToken(); pipe(..., observer=token)``
    then ``token.cancel()``; the run raises GenerationCancelled before its next step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def cancelled(self) -> bool:
        return self._event.is_set()


class Previews(Observer):
    """Calls `callback(progress, images)` with the decoded x0 estimate every `every` steps of
    every pass (and at its last step)."""

    def __init__(self, callback: Callable[[Progress, list[Image.Image]], None], every: int = 5):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.callback, self.every = callback, every

    def on_step(self, progress: Progress) -> None:
        if progress.step % self.every == 0 or progress.step == progress.total:
            self.callback(progress, progress.preview())


def as_observers(observer: Observer | Sequence[Observer] | None) -> list[Observer]:
    if observer is None:
        return []
    observers = [observer] if isinstance(observer, Observer) else list(observer)
    for o in observers:
        if not isinstance(o, Observer):
            from ldm_engine.errors import UserInputError
            raise UserInputError(f"observer must be a pipelines.observe.Observer, got "
                                 f"{type(o).__name__}")
    return observers
