"""A whole model between the single-file (LDM) layout and ``ModelState``.

A single file is one flat dict: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE)
and ``cond_stage_model.*`` (text encoder), plus whatever training left behind: the EMA copy
(``model_ema.*``), the noise schedule as buffers (``betas``, ``alphas_cumprod``, ...) and for SD-1
CLIP's ``position_ids``. The configs a diffusers folder keeps in JSON have no place in the LDM
layout (LDM kept them in a separate YAML), so the files we write carry them as safetensors
metadata under ``ldm_engine.*``; with them a file converts back to exactly the folder it came from.
Files from elsewhere have no such metadata and their configs are inferred (see detect.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch
from transformers import CLIPTextConfig

from schedulers import ScheduleConfig

from ..config_check import check_model_configs, check_scheduler_config
from ..errors import UserInputError
from .detect import check_supported, infer_architecture, layout_of
from .errors import CheckpointError
from .keys_text import TEXT_PREFIX, text_from_ldm, text_to_ldm
from .keys_unet import EMA_BOOKKEEPING, EMA_PREFIX, LDM_PREFIX as UNET_PREFIX
from .keys_unet import has_ema, select_ema, unet_from_ldm, unet_to_ldm
from .keys_vae import LDM_PREFIX as VAE_PREFIX
from .keys_vae import LOSS_PREFIX as VAE_LOSS_PREFIX
from .keys_vae import vae_from_ldm, vae_to_ldm
from .model_state import ModelState

META = "ldm_engine."
_META_CONFIGS = ("unet_config", "vae_config", "text_config", "scheduler_config")
# The released SD-2 512-base checkpoint stopped training at this step; it predicts eps, while the
# 768-v model (and SD-2.1) predict v. diffusers' converter uses the same tell.
SD2_BASE_GLOBAL_STEP = 875000
PREDICTIONS = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction",
               "v_prediction": "v_prediction"}


def _digest(meta: Mapping[str, str]) -> str:
    # safetensors has no checksum. The configs decide what the weights compute (a flipped digit
    # in scaling_factor or prediction_type changes every image), so ours carry one.
    h = hashlib.sha256()
    for key in sorted(k for k in meta if k.startswith(META) and k != META + "sha256"):
        h.update(f"{key}={meta[key]}\n".encode())
    return h.hexdigest()


def encode_metadata(state: ModelState) -> dict[str, str]:
    meta = {META + "family": state.family, META + "text_layout": state.text_layout,
            META + "tokenizer_pad": state.tokenizer_pad}
    for name in _META_CONFIGS:
        meta[META + name] = json.dumps(getattr(state, name), sort_keys=True)
    return {"format": "pt", **meta, META + "sha256": _digest(meta)}


def decode_metadata(meta: Mapping[str, str], source: str) -> dict | None:
    """Our configs from a file's metadata; None for files we did not write."""
    if not any(k.startswith(META) for k in meta):
        return None
    if meta.get(META + "sha256") != _digest(meta):
        raise CheckpointError(f"{source}: the ldm_engine metadata fails its checksum (damaged or "
                              "edited); pass --family to ignore it and infer the configs")
    out = {}
    try:
        for name in _META_CONFIGS:
            value = json.loads(meta[META + name])
            if not isinstance(value, dict):
                raise ValueError(f"{name} is not a JSON object")
            out[name] = value
        choices = (("text_layout", ("clip", "open_clip")), ("tokenizer_pad", ("eos", "zero")))
        for name, valid in choices:
            if meta[META + name] not in valid:
                raise ValueError(f"{name}={meta[META + name]!r}")
            out[name] = meta[META + name]
        out["family"] = meta.get(META + "family", "custom")
        # The digest only proves the metadata is what its writer meant, not that it is sane (it
        # is no secret, so an edited file can carry a matching one): check every field the
        # networks will be built from, as for a folder's config.json files.
        check_model_configs(out["unet_config"], out["vae_config"], out["text_config"],
                            where={"unet": "unet_config", "vae": "vae_config",
                                   "text_encoder": "text_config"})
        check_scheduler_config(out["scheduler_config"], "scheduler_config")
        ScheduleConfig.from_dict(out["scheduler_config"])
    except (KeyError, ValueError, RecursionError) as e:   # ConfigError is a ValueError
        raise CheckpointError(f"{source}: damaged ldm_engine metadata ({e})") from None
    return out


def state_to_ldm(state: ModelState) -> dict[str, torch.Tensor]:
    """The single-file dict of a model: exactly the three networks, nothing derived."""
    out = unet_to_ldm(state.unet, state.unet_config)
    out.update(vae_to_ldm(state.vae, state.vae_config))
    out.update(text_to_ldm(state.text_encoder, state.text_config, state.text_layout))
    return out


def resolve_prediction(prediction: str | None, meta: dict | None, default: str, family: str,
                       extras: Mapping, notes: list[str]) -> str:
    """--prediction, else what our metadata recorded, else the family's default.

    Only SD-2-style models are ambiguous: the 768-v model and SD-2.1 predict v, the 512-base model
    eps, and the weights do not say which. Our SD-2 family defaults to v; a .ckpt whose global_step
    is the 512-base release's says eps.
    """
    if prediction is not None:
        return PREDICTIONS[prediction]
    if meta is not None:
        return meta["scheduler_config"].get("prediction_type", "epsilon")
    if default == "v_prediction":
        if extras.get("global_step") == SD2_BASE_GLOBAL_STEP:
            notes.append(f"global_step {SD2_BASE_GLOBAL_STEP} marks the SD-2 512-base model: "
                         "epsilon prediction")
            return "epsilon"
        notes.append(f"prediction type not recorded in the file: assuming v_prediction (family "
                     f"{family}: SD-2 768-v and 2.1); pass --prediction eps for a 512-base model")
    return default


def state_from_ldm(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                   extras: Mapping, source: str, *, ema: bool = False, family: str | None = None,
                   prediction: str | None = None) -> ModelState:
    """A model from a single file's tensors, metadata and scalar extras (e.g. global_step)."""
    layout = check_supported(tensors, source)
    notes: list[str] = []
    # --family is the user overruling whatever the file says about itself.
    meta = decode_metadata(metadata, source) if family is None else None
    if meta is not None:
        layout = write_layout = meta["text_layout"]
        unet_cfg, vae_cfg, text_cfg = meta["unet_config"], meta["vae_config"], meta["text_config"]
        fam_name, pad = meta["family"], meta["tokenizer_pad"]
        scheduler = dict(meta["scheduler_config"])
    else:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        arch = infer_architecture(shapes, layout, source, family)
        unet_cfg, vae_cfg = arch.unet.to_diffusers(), arch.vae.to_diffusers()
        text_cfg = CLIPTextConfig(**arch.text_encoder.to_transformers()).to_dict()
        fam_name, pad = arch.family, arch.base.tokenizer_pad
        # Written back in the family's own layout: an SD-2 tower read from CLIPTextModel names
        # (see detect._layout_fits) is written as OpenCLIP's, as every SD-2 file has it.
        write_layout = layout_of(arch.base)
        scheduler = arch.base.schedule.to_dict("DDIMScheduler")
        if arch.family == "custom":
            notes.append(f"architecture matches no known family: SD-{1 if layout == 'clip' else 2} "
                         "constants assumed for what the weights do not show (attention heads, "
                         "...)")
    pred = resolve_prediction(prediction, meta, scheduler.get("prediction_type", "epsilon"),
                              fam_name, extras, notes)
    if meta is None and fam_name == "sd2" and pred == "epsilon":
        unet_cfg["sample_size"] = 64                       # the 512-base model: 512 px / 8
    scheduler["prediction_type"] = pred

    unet_src = {k: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    if ema:
        if not has_ema(tensors):
            raise UserInputError(f"{source} has no EMA weights (model_ema.*): drop --ema")
        try:
            unet_src = select_ema(tensors)
        except KeyError as e:
            raise CheckpointError(f"{source}: {e.args[0]}") from None
        notes.append("converted the UNet's EMA weights (model_ema.*)")
    elif has_ema(tensors):
        notes.append("the file also holds EMA weights (model_ema.*); converted the live ones "
                     "(pass --ema for the EMA ones)")
    try:
        unet = unet_from_ldm(unet_src, unet_cfg)
        vae_src = {k: v for k, v in tensors.items()
                   if k.startswith(VAE_PREFIX) and not k.startswith(VAE_LOSS_PREFIX)}
        vae = vae_from_ldm(vae_src, vae_cfg)
        text_src = {k: v for k, v in tensors.items() if k.startswith(TEXT_PREFIX)}
        text, dropped = text_from_ldm(text_src, text_cfg, layout)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{source} does not match the architecture of family {fam_name}: "
                              f"{e.args[0]}") from None
    other = [k for k in tensors if k.startswith(VAE_LOSS_PREFIX) or (
             not k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, EMA_PREFIX))
             and k not in EMA_BOOKKEEPING)]
    if dropped:
        notes.append(f"dropped {len(dropped)} text-encoder tensors a diffusers folder cannot hold "
                     f"(unused by SD inference): {', '.join(short_list(dropped))}")
    if other:
        notes.append(f"ignored {len(other)} tensors outside the three networks (training state "
                     f"such as the noise schedule or the VAE's loss): "
                     f"{', '.join(short_list(other))}")
    return ModelState(unet=unet, vae=vae, text_encoder=text, unet_config=unet_cfg,
                      vae_config=vae_cfg, text_config=text_cfg, scheduler_config=scheduler,
                      tokenizer_pad=pad, text_layout=write_layout, family=fam_name, notes=notes)


def short_list(keys: list[str], n: int = 3) -> list[str]:
    return sorted(keys)[:n] + ([f"... ({len(keys) - n} more)"] if len(keys) > n else [])
