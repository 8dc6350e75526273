"""Speed options of a pipeline: what runs compiled, laid out how, and the opt-in approximations.

The exact options (compile, channels_last, attention kernel) change speed and rounding only. The
approximate ones (deep cache, VAE tiling) change the image and are off by default; BENCHMARKS.md
reports what they cost in PSNR against the exact image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ldm_engine.compiled import AOTCompiled, OffloadableWeights
from ldm_engine.errors import UserInputError

from .deepcache import DeepCache, check_supported, deep, head, tail

Attention = Literal["sdpa", "xformers"]


@dataclass(frozen=True)
class SpeedOptions:
    # The UNet as AOTInductor packages with frozen, pre-packed weights, one per input shape.
    compile: bool = False
    # None: channels_last whenever weights are bf16/fp16 (oneDNN's and cuDNN's fast convolution
    # layout); fp32 stays in the default layout, where it is numerically identical to diffusers.
    channels_last: bool | None = None
    # torch SDPA (flash / memory-efficient kernels where the device has them) or xformers (CUDA only).
    attention: Attention = "sdpa"
    # Approximate: run the deep UNet blocks only every N-th step and reuse them in between (1 = off).
    deep_cache: int = 1
    # Approximate: decode large images in overlapping tiles, which bounds the VAE's memory.
    vae_tiling: bool = False

    def __post_init__(self):
        if not isinstance(self.deep_cache, int) or isinstance(self.deep_cache, bool) \
                or self.deep_cache < 1:
            raise UserInputError(
                f"deep_cache must be an integer >= 1 (1 = off), got {self.deep_cache!r}")
        if self.attention not in ("sdpa", "xformers"):
            raise UserInputError(f"unknown attention {self.attention!r}: sdpa or xformers")

    def check_device(self, device: torch.device) -> None:
        """What can only be checked against the device, before any weights are read."""
        if self.attention == "xformers":
            if device.type != "cuda":
                raise UserInputError("xformers attention has no CPU kernels; use attention='sdpa'")
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise UserInputError("attention='xformers' needs the optional extra: "
                                     "pip install 'ldm-engine[xformers]'") from None

    def uses_channels_last(self, dtype: torch.dtype) -> bool:
        return self.channels_last if self.channels_last is not None else dtype != torch.float32

    @property
    def approximate(self) -> bool:
        return self.deep_cache > 1 or self.vae_tiling


def _unet_call(unet, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    return unet(x, t, encoder_hidden_states=states, return_dict=False)[0]


class Accelerated:
    """The speed options applied to one set of networks: callables the pipeline runs."""

    def __init__(self, unet, vae, options: SpeedOptions, *, unet_file: Path | None = None):
        """unet_file: where the UNet's weights were read from; with it, compiled runs drop the
        eager UNet weights from memory while its packages are in use (see OffloadableWeights)."""
        self.options = options
        self.unet = unet
        self.vae = vae
        options.check_device(unet.device)
        if options.attention == "xformers":
            unet.enable_xformers_memory_efficient_attention()
        channels_last = options.uses_channels_last(unet.dtype)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:        # a no-op for weights loaded channels-last already
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
        if options.vae_tiling:
            vae.enable_tiling()
        if options.deep_cache > 1:
            check_supported(unet)
        # Only the UNet is compiled. The VAE decoder is nearly all large convolutions that oneDNN
        # already runs near peak: compiled it measured slower on CPU (0.75 s vs 0.67 s eager at
        # 256x256, bf16), and on CUDA an fp16 SD VAE decodes in fp32 anyway (force_upcast).
        self.compiled_unet = self.pieces = None
        if options.compile:
            offload = (OffloadableWeights.for_file(unet, unet_file, self.memory_format)
                       if unet_file else None)
            if options.deep_cache > 1:
                self.pieces = tuple(AOTCompiled(unet, piece, name=f"unet-{piece.__name__}",
                                                offload=offload)
                                    for piece in (head, deep, tail))
            else:
                self.compiled_unet = AOTCompiled(unet, _unet_call, name="unet", offload=offload)

    @property
    def compiles(self) -> int:
        parts = [self.compiled_unet, *(self.pieces or ())]
        return sum(p.compiles for p in parts if p is not None)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def denoiser(self):
        """The (x, t, states) -> out callable for one generation (deep-cache state is per call).

        Latents stay fp32 between steps and only the network runs in its own dtype: the sampler's
        update x_prev = a * x0 + b * eps adds small corrections to a large x, which bf16's 8-bit
        mantissa would round away step after step.
        """
        if self.options.deep_cache > 1:
            run = DeepCache(self.unet, self.options.deep_cache, pieces=self.pieces)
        elif self.compiled_unet is not None:
            run = self.compiled_unet
        else:
            run = functools.partial(_unet_call, self.unet)
        dtype = self.unet.dtype
        return lambda x, t, states: run(self.layout(x.to(dtype)), t, states).float()

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.layout(z), return_dict=False)[0]
