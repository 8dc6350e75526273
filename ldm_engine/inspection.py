"""Describe a model without loading its networks.

A folder is described from its JSON configs and safetensors headers; a ``.safetensors`` single
file from its header alone; a ``.ckpt`` has to be unpickled (safely, see convert/ckpt.py) and
is checked whole on the way.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

from .components import (TEXT_WEIGHTS, UNET_WEIGHTS, VAE_WEIGHTS, check_model_folder,
                         detect_family)
from .formats import check_safetensors


def _tensor_stats(header: dict) -> tuple[int, Counter]:
    params, dtypes = 0, Counter()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        n = math.prod(info["shape"])
        params += n
        dtypes[info["dtype"]] += n
    return params, dtypes


def inspect_folder(path: str | os.PathLike) -> dict:
    root = check_model_folder(path)
    unet_cfg = json.loads((root / "unet/config.json").read_text())
    text_cfg = json.loads((root / "text_encoder/config.json").read_text())
    sched = json.loads((root / "scheduler/scheduler_config.json").read_text())
    report = {
        "path": str(root),
        "kind": "diffusers folder",
        "family": detect_family(unet_cfg, text_cfg),
        "prediction_type": sched.get("prediction_type", "epsilon"),
        "unet_in_channels": unet_cfg.get("in_channels", 4),
        "components": {},
    }
    for name, rel in (("unet", UNET_WEIGHTS), ("vae", VAE_WEIGHTS), ("text_encoder", TEXT_WEIGHTS)):
        params, dtypes = _tensor_stats(check_safetensors(root / rel))
        report["components"][name] = {"parameters": params, "dtypes": dict(dtypes)}
    return report


# Groups of single-file tensors, by key prefix.
_FILE_GROUPS = (("unet", "model.diffusion_model."), ("vae", "first_stage_model."),
                ("text_encoder", "cond_stage_model."))


def _group_stats(entries: dict[str, tuple[tuple[int, ...], str]]) -> dict:
    params, dtypes = 0, Counter()
    for shape, dtype in entries.values():
        n = math.prod(shape)
        params += n
        dtypes[dtype] += n
    return {"parameters": params, "dtypes": dict(dtypes), "tensors": len(entries)}


def inspect_file(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict:
    """Kind, family, prediction type, per-network parameter counts and dtypes, EMA, metadata."""
    # Imported here so that describing a folder does not pay for the converter's imports.
    from .convert.detect import check_supported, infer_architecture
    from .convert.errors import UnsupportedModelError
    from .convert.keys_text import is_unused_text_key
    from .convert.keys_unet import EMA_BOOKKEEPING, EMA_PREFIX
    from .convert.keys_vae import LOSS_PREFIX
    from .convert.ldm_layout import decode_metadata, resolve_prediction, short_list
    from .convert.single_file import read_shapes

    notes: list[str] = []
    kind, entries, metadata, extras = read_shapes(path, trust_pickle=trust_pickle, notes=notes)
    report = {"path": str(path), "kind": f"{kind} single file", "family": "unsupported",
              "prediction_type": "unknown", "unet_in_channels": None, "components": {},
              "ema": None, "metadata": {**metadata, **{k: str(v) for k, v in extras.items()}},
              "notes": notes}
    shapes = {k: shape for k, (shape, _) in entries.items()}
    try:
        layout = check_supported(shapes, str(path))
    except UnsupportedModelError as e:
        notes.append(str(e))
        layout = None
    num_layers = 0
    if layout is not None:
        meta = decode_metadata(metadata, str(path))
        if meta is not None:
            family, layout = meta["family"], meta["text_layout"]
            default = meta["scheduler_config"].get("prediction_type", "epsilon")
            num_layers = meta["text_config"]["num_hidden_layers"]
            in_channels = meta["unet_config"].get("in_channels", 4)
        else:
            arch = infer_architecture(shapes, layout, str(path))
            family, default = arch.family, arch.base.schedule.prediction_type
            num_layers = arch.text_encoder.num_hidden_layers
            in_channels = arch.unet.in_channels
        prediction = resolve_prediction(None, meta, default, family, extras, notes)
        report.update(family=family, text_layout=layout, unet_in_channels=in_channels,
                      prediction_type=prediction)
    grouped: dict[str, dict] = {name: {} for name, _ in _FILE_GROUPS}
    ema, dropped, other = {}, [], {}
    for key, entry in entries.items():
        group = next((name for name, prefix in _FILE_GROUPS if key.startswith(prefix)), None)
        if key.startswith(LOSS_PREFIX):
            group = None                                  # training-only, not part of the VAE
        if group == "text_encoder" and layout and is_unused_text_key(key, layout, num_layers):
            dropped.append(key)
        elif group is not None:
            grouped[group][key] = entry
        elif key.startswith(EMA_PREFIX) and key not in EMA_BOOKKEEPING:
            ema[key] = entry
        else:
            other[key] = entry
    report["components"] = {name: _group_stats(e) for name, e in grouped.items()}
    report["ema"] = _group_stats(ema) if ema else None
    if dropped:
        notes.append(f"{len(dropped)} text-encoder tensors have no place in a diffusers folder and "
                     f"are dropped on conversion: {', '.join(short_list(dropped))}")
    if other:
        notes.append(f"{len(other)} tensors outside the three networks (not converted): "
                     f"{', '.join(short_list(list(other)))}")
    return report


def inspect_path(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict:
    return (inspect_folder(path) if Path(path).is_dir()
            else inspect_file(path, trust_pickle=trust_pickle))


def format_report(report: dict) -> str:
    in_channels = report["unet_in_channels"]
    lines = [f"{report['path']}: {report['kind']}, family {report['family']}, "
             f"{report['prediction_type']} prediction"
             + (f", UNet in_channels {in_channels}" if in_channels is not None else "")]
    total = 0
    for name, info in report["components"].items():
        total += info["parameters"]
        dtypes = ", ".join(sorted(info["dtypes"]))
        lines.append(f"  {name:<13} {info['parameters']:>13,} parameters  [{dtypes}]")
    lines.append(f"  {'total':<13} {total:>13,} parameters")
    if "text_layout" in report:
        lines.append("  text encoder layout: " + ("OpenCLIP (SD-2, cond_stage_model.model.*)"
                     if report["text_layout"] == "open_clip"
                     else "OpenAI CLIP (SD-1, cond_stage_model.transformer.*)"))
    if "ema" in report:
        ema = report["ema"]
        lines.append("  EMA weights: none" if ema is None else
                     f"  EMA weights: present, {ema['parameters']:,} parameters in "
                     f"{ema['tensors']} tensors (model_ema.*; `ldm convert --ema` uses them)")
    for key, value in sorted(report.get("metadata", {}).items()):
        # Our embedded configs are long JSON; their presence is what matters here.
        shown = value if len(value) <= 80 else f"{value[:60]}... ({len(value)} characters)"
        lines.append(f"  metadata {key}: {shown}")
    lines.extend(f"  note: {note}" for note in report.get("notes", ()))
    return "\n".join(lines)


