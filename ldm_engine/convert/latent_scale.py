"""A VAE's own latent scaling factor folded into its weights, for readers that assume the standard.

The diffusion model works on x = c * z, where z ~ N(mean, sigma^2) is the VAE encoder's latent
and c is the VAE's ``scaling_factor`` (chosen so that x has roughly unit variance); images are
decoded from D(x / c). diffusers reads c from ``vae/config.json``. A single file has no config:
AUTOMATIC1111 and ComfyUI decide the family from the text-encoder layout and use that family's
c -- 0.18215 for SD-1 (OpenAI CLIP) and for SD-2 (OpenCLIP) alike. A model whose VAE was
trained here has its own c (0.99277 for the bundled one), so its single file would be decoded by
them with the wrong factor, silently: washed-out or saturated images, not an error.

So a single file is written with the standard factor c0, and the difference s = c / c0 is folded
into the two 1x1 convolutions on either side of the latent. The encoder's ``quant_conv`` maps
features h to the moments: rows [0, C) are the mean, rows [C, 2C) are log sigma^2. For a VAE whose
latent is z' = s * z (so that c0 * z' = c * z, the same x):

    mean'          = s * mean              ->  W[:C] *= s,   b[:C] *= s
    log sigma'^2   = log sigma^2 + 2 ln s  ->  b[C:] += 2 ln s          (sigma' = s * sigma)

and the decoder's ``post_quant_conv`` sees z' = x / c0 = s * (x / c) instead of x / c, so its
weight over the input channels is divided by s (W' z' = W z; its bias is unchanged). Every later
layer sees exactly what it saw before, so encoding, sampling and decoding are unchanged up to
float rounding. The arithmetic is done in float64 and rounded once to the weights' dtype.

One caveat, stated for completeness: diffusers and LDM clamp log sigma^2 to [-30, 20] before
sampling, so a log-variance within 2 |ln s| of a bound would be clamped differently and the two
VAEs' *sampled* latents would differ (means never are). The bundled VAE's log-variances span
[-15.3, -0.06] on its own images (2 ln s = 3.39 for it), well inside.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .errors import CheckpointError
from .keys_text import TextLayout
from .model_state import ModelState

# The factor every single-file reader assumes for the family it detects from the text-encoder
# layout: 0.18215 is LDM's value for SD-1's VAE, and SD-2 reuses that VAE (A1111's v2 configs and
# ComfyUI's SD20 latent format both say 0.18215).
STANDARD_SCALING_FACTOR: dict[TextLayout, float] = {"clip": 0.18215, "open_clip": 0.18215}
# diffusers' default when a VAE config omits the field.
DEFAULT_SCALING_FACTOR = 0.18215


def scaling_factor(vae_config: Mapping) -> float:
    value = vae_config.get("scaling_factor", DEFAULT_SCALING_FACTOR)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise CheckpointError(f"the VAE's scaling_factor must be a positive number, got {value!r}")
    return float(value)


def fold_scaling_factor(vae: Mapping[str, torch.Tensor], latent_channels: int, s: float,
                        dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The VAE's weights (diffusers names) with latents scaled by s, as in the module docstring.

    dtype: the dtype of the folded tensors (None: each keeps its own).
    """
    c = latent_channels
    names = ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight")
    missing = [k for k in names if k not in vae]
    if missing:
        raise CheckpointError(f"cannot fold the latent scale: the VAE has no {missing[0]}")
    out = dict(vae)
    weight = vae["quant_conv.weight"].double()                    # (2C, F, 1, 1)
    bias = vae["quant_conv.bias"].double()                        # (2C,)
    if weight.shape[0] != 2 * c or bias.shape != (2 * c,):
        raise CheckpointError(f"cannot fold the latent scale: quant_conv has {weight.shape[0]} "
                              f"outputs, not mean and log-variance of {c} channels")
    weight[:c] *= s
    bias[:c] *= s
    bias[c:] += 2 * math.log(s)
    post = vae["post_quant_conv.weight"].double() / s              # (C, C, 1, 1): over inputs
    for key, value in (("quant_conv.weight", weight), ("quant_conv.bias", bias),
                       ("post_quant_conv.weight", post)):
        out[key] = value.to(dtype or vae[key].dtype)
    return out


def with_standard_scaling(state: ModelState, dtype: torch.dtype | None = None) -> ModelState:
    """The state as a single file should hold it: the layout's standard latent scaling factor,
    the VAE's own folded into its weights (the state itself if the factor is standard already)."""
    standard = STANDARD_SCALING_FACTOR[state.text_layout]
    own = scaling_factor(state.vae_config)
    if own == standard:
        return state
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if state.vae_config.get(key) is not None:
            raise CheckpointError(f"cannot write a single file for a VAE with {key} set: SD-1/SD-2 "
                                  "single-file readers know only a scaling factor")
    vae = fold_scaling_factor(state.vae, state.vae_config.get("latent_channels", 4),
                              own / standard, dtype)
    note = (f"the VAE's latent scaling_factor {own} is not the {standard} that single-file readers "
            f"(AUTOMATIC1111, ComfyUI) assume: folded the ratio {own / standard:.6g} into its "
            f"quant_conv and post_quant_conv weights and wrote scaling_factor {standard}, so every "
            "tool decodes the same images (equal up to float rounding)")
    return state.replace(vae=vae, vae_config={**state.vae_config, "scaling_factor": standard},
                         notes=[*state.notes, note])
