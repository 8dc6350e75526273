"""Training configuration: typed dataclasses <-> YAML, with `key.sub=value` command-line overrides.

    accelerate launch -m train train/configs/default.yaml unet.steps=2000 output_dir=runs/x
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# The models that ship inside the package (the bundled default model).
from ldm_engine.paths import BUNDLED_MODELS

Stage = Literal["clip", "vae", "unet"]
# Per-stage autocast. bf16 needs no loss scaling and runs fast on CPUs with AVX-512-bf16 and on
# Ampere+ GPUs; fp16 autocast is left out (it needs a grad scaler and is unusably slow on CPUs).
Precision = Literal["fp32", "bf16"]


@dataclass(kw_only=True)
class DataConfig:
    # "shapes": the synthetic captioned world (train/shapes.py); "imagefolder": a Hugging Face
    # imagefolder (metadata.jsonl with file_name + text, or .txt sidecars).
    source: Literal["shapes", "imagefolder"] = "shapes"
    path: str = ""
    # Shapes world: how many training scenes to render (deterministic from `seed`).
    num_images: int = 20000
    # Images are resized (shorter side) and centre-cropped to size x size.
    size: int = 64


@dataclass(kw_only=True)
class ClipStage:
    """Contrastive CLIP (Radford et al. 2021) on image-caption pairs; both towers are kept (the
    text tower conditions the UNet, the image tower reranks and classifies)."""
    steps: int = 1500
    batch_size: int = 256
    lr: float = 5e-4
    warmup_steps: int = 100
    # Text tower: its hidden size is the UNet's cross-attention width.
    hidden_size: int = 64
    layers: int = 3
    heads: int = 4
    # Vision tower: a small ViT over size x size images.
    vision_hidden_size: int = 96
    vision_layers: int = 3
    patch_size: int = 8
    projection_dim: int = 64
    # NegCLIP hard negatives (train/negatives.py): this many rewritten captions per caption, one
    # of them used per image and step; 0 trains plain CLIP.
    hard_negatives: int = 0
    # Phase 2: this many more steps train only the image tower and the projections against the
    # frozen text tower (the UNet's conditioning is fixed by then), with this many hard negatives
    # per caption. They sharpen reranking and zero-shot classification; 0 steps skips the phase.
    image_steps: int = 0
    image_hard_negatives: int = 4
    mixed_precision: Precision = "fp32"


@dataclass(kw_only=True)
class VaeStage:
    """KL autoencoder (Rombach et al. 2022): L1 + L2 reconstruction and a small KL term."""
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    # Three levels: a 4x factor (64 px images -> 16x16x4 latents), enough room for shape edges.
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    # Small KL weight: latents stay near N(0, I) without blurring reconstructions.
    kl_weight: float = 1e-6
    mixed_precision: Precision = "fp32"


@dataclass(kw_only=True)
class UNetStage:
    """Text-conditioned latent diffusion UNet (eps or v objective)."""
    steps: int = 2000
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 100
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    # "": the objective of the model being fine-tuned (init_from), epsilon for a new one. Naming
    # one switches a fine-tuned model to it (its saved scheduler config says which it predicts).
    prediction_type: Literal["", "epsilon", "v_prediction"] = ""
    # Drop the caption this often so one network also learns the unconditional model (for CFG).
    caption_dropout: float = 0.1
    # Min-SNR-gamma loss weighting (Hang et al. 2023); 0 disables it.
    min_snr_gamma: float = 5.0
    # Offset noise: adds a per-channel constant to the noise so very dark/bright images are
    # reachable; 0 disables it.
    offset_noise: float = 0.0
    ema_decay: float = 0.999
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: Precision = "bf16"
    # Encode images to latents and captions to text states once and reuse them every epoch.
    cache: bool = True
    # Fine-tune an existing diffusers folder instead of training from the clip/vae stages.
    init_from: str = ""
    train_text_encoder: bool = False


@dataclass(kw_only=True)
class TrainConfig:
    stages: tuple[Stage, ...] = ("clip", "vae", "unet")
    output_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipStage = field(default_factory=ClipStage)
    vae: VaeStage = field(default_factory=VaeStage)
    unet: UNetStage = field(default_factory=UNetStage)
    checkpoint_every: int = 500
    # Complete checkpoints kept per stage; older ones are pruned only after a new one verifies.
    keep_checkpoints: int = 2
    # "" (start fresh) or "latest" (continue from the newest complete checkpoint of each stage).
    resume: str = ""
    log_every: int = 50
    # Sample a grid from validation prompts into TensorBoard every this many UNet steps (0: never).
    sample_every: int = 500
    validation_prompts: tuple[str, ...] = (
        "a red circle on the left", "a blue square at the top",
        "a yellow triangle in the centre, green background",
        "a red circle to the left of a blue square")
    # Refuse to run unless exactly this many processes were launched (0: no check). accelerate's
    # `--cpu --num_processes N` silently starts one process; this catches it.
    num_processes: int = 0
    # Where the finished model folder goes (default: <output_dir>/model). A run writes into the
    # bundled model (ldm_engine/models/) only when model_dir is given on the command line, as
    # `make train-default` does: a config file, or a copy of one, can never replace it by accident.
    model_dir: str = ""
    # Cast the shipped weights (e.g. "fp16" halves the bundled model's size).
    save_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"

    @property
    def model_path(self) -> Path:
        return Path(self.model_dir) if self.model_dir else Path(self.output_dir) / "model"


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, with errors that name the key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        (inner, *_rest) = typing.get_args(tp)
        return tuple(_coerce(inner, v, where) for v in items)
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def _build(cls: type, values: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or 'config'}; "
                         f"valid: {sorted(names)}")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}" if where else k)
                  for k, v in values.items()})


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    raw: dict = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a training config is a YAML mapping")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        # YAML parsing gives overrides the same typing as the file ("3" -> 3, "[a, b]" -> list).
        node[leaf] = yaml.safe_load(value)
    config = _build(TrainConfig, raw)
    explicit = any(item.partition("=")[0] == "model_dir" for item in overrides)
    _check_model_dir(config, explicit)
    return config


def _check_model_dir(config: TrainConfig, explicit: bool) -> None:
    """Refuse to write the finished model into the package unless asked on the command line."""
    target = config.model_path.resolve()
    if not explicit and target.is_relative_to(BUNDLED_MODELS):
        raise ValueError(
            f"model_dir {config.model_dir or config.model_path} is inside the bundled models "
            f"({BUNDLED_MODELS}); a training run writes its model under output_dir. To replace "
            "the bundled model on purpose, pass model_dir=... on the command line "
            "(`make train-default` does)")


def to_dict(config: TrainConfig) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))
