"""What every pipeline shares: text encoding, seeding, guidance set-up, VAE decoding, results."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ldm_engine.components import UNET_WEIGHTS, Components, load_model
from ldm_engine.errors import NonFiniteError, UserInputError
from ldm_engine.precision import resolve_device, resolve_dtype

from .guidance import Guidance, UNetFn
from .params import GenerationParams
from .pnginfo import save_png
from .speed import Accelerated, Attention, SpeedOptions

log = logging.getLogger("ldm_engine.pipelines")


@dataclass
class GenerationResult:
    images: list[Image.Image]
    pixels: torch.Tensor                 # (B, 3, H, W) float32 in [0, 1]
    latents: torch.Tensor                # (B, C, h, w) final latents, before VAE scaling is undone
    params: list[GenerationParams]       # one per image; seed is that image's own seed

    def save(self, path: str | os.PathLike) -> list[Path]:
        """Save PNGs with their parameters; several images become name-0.png, name-1.png, ..."""
        path = Path(path)
        if len(self.images) == 1:
            paths = [path]
        else:
            paths = [path.with_name(f"{path.stem}-{k}{path.suffix or '.png'}")
                     for k in range(len(self.images))]
        for image, params, p in zip(self.images, self.params, paths):
            save_png(image, p, params)
        return paths


def as_prompt_list(prompt: str | Sequence[str], what: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    prompts = list(prompt)
    if not prompts:
        raise UserInputError(f"empty {what} list: give at least one {what}")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise UserInputError(f"every {what} must be a string, got {type(bad[0]).__name__}")
    return prompts


def make_generators(n: int, seed: int | None,
                    generator: torch.Generator | Sequence[torch.Generator] | None
                    ) -> tuple[list[torch.Generator], list[int]]:
    """One CPU generator per image, and the seed each one stands for.

    Image j of a seeded call uses seed + j, so image j of a batch equals a single generation with
    seed + j (the AUTOMATIC1111 convention). A single user generator serves all images in turn.
    """
    if generator is not None:
        gens = list(generator) if isinstance(generator, Sequence) else [generator] * n
        if len(gens) != n:
            raise UserInputError(f"got {len(gens)} generators for {n} images; pass one per image")
        return gens, [g.initial_seed() for g in gens]
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UserInputError(f"seed must be a non-negative integer, got {seed!r}")
    seeds = [seed + j for j in range(n)]
    return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds


class Pipeline:
    def __init__(self, components: Components, *, name: str = "",
                 speed: SpeedOptions | None = None, unet_file: Path | None = None,
                 source: Path | None = None):
        # Not forced into eval mode here: training samples with its live networks and must get
        # them back unchanged (loaded models are already in eval mode). Without speed options the
        # networks are used exactly as given; with them, they may be re-laid out and compiled.
        self.components = components
        self.name = name
        # The folder or file the weights came from (None: built in memory, e.g. by training).
        self.source = source
        self.accelerated = (Accelerated(components.unet, components.vae, speed,
                                        unet_file=unet_file) if speed is not None else None)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = torch.float32, compile: bool = False,
                    deep_cache: int = 1, vae_tiling: bool = False, attention: Attention = "sdpa",
                    channels_last: bool | None = None):
        """Load a local diffusers-layout folder.

        device: "auto" | "cpu" | "cuda[:N]"; dtype: "auto" | "fp32" | "bf16" | "fp16" or a torch
        dtype ("auto": bf16 on CPUs with native bf16, fp16 on CUDA, else fp32). The speed options
        are those of SpeedOptions; deep_cache > 1 and vae_tiling are approximations.
        """
        speed = SpeedOptions(compile=compile, channels_last=channels_last, attention=attention,
                             deep_cache=deep_cache, vae_tiling=vae_tiling)
        where = resolve_device(device)
        precision = resolve_dtype(dtype, where)
        speed.check_device(where)
        components = load_model(path, device=where, dtype=precision,
                                channels_last=speed.uses_channels_last(precision))
        return cls(components, name=Path(path).name, speed=speed,
                   unet_file=Path(path) / UNET_WEIGHTS, source=Path(path))

    @property
    def device(self) -> torch.device:
        return self.components.device

    @property
    def dtype(self) -> torch.dtype:
        return self.components.dtype

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP last hidden states (B, 77, D); each distinct text goes through the encoder once."""
        unique = list(dict.fromkeys(texts))
        ids = self.components.tokenizer(unique).to(self.device)          # (U, 77)
        states = self.components.text_encoder(ids)[0]                    # (U, 77, D)
        index = torch.tensor([unique.index(t) for t in texts], device=self.device)
        return states.index_select(0, index)

    def guidance(self, prompts: list[str], negatives: list[str], scale: float) -> Guidance:
        if scale == 1.0:
            return Guidance(scale, self.encode_text(prompts), None)
        states = self.encode_text(prompts + negatives)
        n = len(prompts)
        return Guidance(scale, states[:n], states[n:])

    def unet_fn(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        out = self.components.unet(x.to(self.dtype), t, encoder_hidden_states=states,
                                   return_dict=False)[0]
        return out.float()

    def denoiser(self) -> UNetFn:
        """The UNet callable for one generation (a fresh one: deep-cache state is per generation)."""
        return self.accelerated.denoiser() if self.accelerated is not None else self.unet_fn

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], (B, 3, H, W) float32; never inf/NaN.

        fp16 has a largest value of 65504, and the SD VAE decoder's activations exceed it (the
        reason diffusers marks it `force_upcast`), so such a VAE decodes in fp32 when loaded in
        fp16. Any other reduced-precision decode that comes out non-finite is redone in fp32.
        """
        if not torch.isfinite(latents).all():
            raise NonFiniteError(
                f"the UNet produced inf/NaN latents in {self.dtype}; this model needs a wider "
                "dtype (bf16 or fp32)")
        vae = self.components.vae
        z = latents / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            z = z + vae.config.shift_factor
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            images = self._decode_fp32(z)
        else:
            images = self._vae_decode(z.to(vae.dtype))
            if vae.dtype != torch.float32 and not torch.isfinite(images).all():
                log.warning("VAE decode overflowed in %s; decoding again in fp32", vae.dtype)
                images = self._decode_fp32(z)
        # The VAE's output lives in [-1, 1].
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.accelerated is not None:
            return self.accelerated.vae_decode(z)
        return self.components.vae.decode(z, return_dict=False)[0]

    def _decode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        # Up- and down-casting fp16/bf16 weights through fp32 is exact, so the VAE is cast in
        # place for this one decode rather than keeping a second, fp32 copy in memory.
        vae = self.components.vae
        dtype = vae.dtype
        # torch's own Module.to: diffusers' override warns on every dtype cast.
        torch.nn.Module.float(vae)
        try:
            return vae.decode(z.float(), return_dict=False)[0]
        finally:
            torch.nn.Module.to(vae, dtype)

    @staticmethod
    def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
        arr = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        return [Image.fromarray(a) for a in arr]
