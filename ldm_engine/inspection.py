"""Describe a model without loading its networks: only JSON configs and safetensors headers are read."""

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


def format_report(report: dict) -> str:
    lines = [f"{report['path']}: {report['kind']}, family {report['family']}, "
             f"{report['prediction_type']} prediction, UNet in_channels {report['unet_in_channels']}"]
    total = 0
    for name, info in report["components"].items():
        total += info["parameters"]
        dtypes = ", ".join(sorted(info["dtypes"]))
        lines.append(f"  {name:<13} {info['parameters']:>13,} parameters  [{dtypes}]")
    lines.append(f"  {'total':<13} {total:>13,} parameters")
    return "\n".join(lines)


