"""One validator for the network configs of a model, wherever they come from.

A diffusers folder keeps them as ``unet/config.json``, ``vae/config.json`` and
``text_encoder/config.json``; a single file we wrote keeps the same dicts in its ``ldm_engine.*``
metadata. diffusers and transformers read these dicts field by field while building the networks
and fail deep inside with ``KeyError``/``TypeError`` (or, for a text encoder too short for 77
tokens, only in the first forward pass). Here every field the engine or the network constructors
read is checked for its type and range first, and a bad one is named in a one-line
``ConfigError``.

A field that is absent takes the library's default, as it does in diffusers; only the fields whose
default can never be right for an SD model (the widths, the latent size, the text width) are
required. The ranges are sanity bounds far outside any real model (SD-XL's widest level is 1280
channels), chosen so that no config can make the engine allocate absurd amounts of memory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelFolderError

# Real configs are about 2 KB; a larger file is not a config.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_WIDTH = 16384               # channels of any level / text hidden size
MAX_LEVELS = 8                  # resolution levels of the UNet or the VAE
MAX_LAYERS = 64                 # resnets per level, transformer layers per block
MAX_CHANNELS = 64               # image / latent channels
MAX_SAMPLE_SIZE = 4096          # the UNet's native latent side
MAX_TEXT_LAYERS = 128
MAX_VOCAB = 10_000_000
MAX_POSITIONS = 16384
MAX_TRAIN_TIMESTEPS = 100_000
# The tokenizer always yields 77 ids (BOS, 75 text tokens, EOS/padding) drawn from CLIP's
# 49,408-symbol BPE vocabulary, so a text encoder with fewer positions or symbols would index out
# of range in its embedding tables during the first forward pass.
TOKENS_PER_PROMPT = 77
CLIP_VOCAB_SIZE = 49408


class ConfigError(ModelFolderError):
    """A config whose field has the wrong type or an impossible value; the message names both."""


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the engine needs to know about a model's architecture before loading any weights."""

    # Pixels per latent pixel: each VAE level after the first halves the resolution.
    vae_factor: int
    # The UNet's native latent side (sample_size); native_side is the same in pixels.
    sample_size: int
    latent_channels: int
    unet_in_channels: int
    unet_widths: tuple[int, ...]
    unet_layers: tuple[int, ...]
    vae_widths: tuple[int, ...]
    vae_layers: int
    text_hidden_size: int

    @property
    def native_side(self) -> int:
        return self.sample_size * self.vae_factor


def read_config_file(path: str | os.PathLike) -> dict:
    """A JSON object from a config file, or a ModelFolderError naming the file and the reason."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ModelFolderError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ModelFolderError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes: not a config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFolderError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise ModelFolderError(f"{path} is not valid JSON: nested too deeply") from None
    except ValueError as e:          # JSONDecodeError, or an integer of over 4300 digits
        raise ModelFolderError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


# --- field checks -------------------------------------------------------------------------------

class _Fields:
    """Typed reads of one config dict; every failure names the config and the field."""

    def __init__(self, cfg: Mapping[str, Any], where: str):
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"{where} must be a JSON object, not {type(cfg).__name__}")
        self.cfg, self.where = cfg, where

    def fail(self, key: str, why: str) -> ConfigError:
        value = self.cfg.get(key, "<missing>")
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return ConfigError(f"{self.where}: {key}={shown} is invalid; {why}")

    def int(self, key: str, default: int | None, lo: int, hi: int) -> int:
        if key not in self.cfg or (self.cfg[key] is None and default is not None):
            if default is None:
                raise ConfigError(f"{self.where}: missing {key} (an integer in [{lo}, {hi}])")
            return default
        value = self.cfg[key]
        if not _is_int(value) or not lo <= value <= hi:
            raise self.fail(key, f"it must be an integer in [{lo}, {hi}]")
        return value

    def int_list(self, key: str, lo: int, hi: int, length: int | None = None) -> tuple[int, ...]:
        """A required non-empty JSON array of integers (of `length` entries if given)."""
        if key not in self.cfg:
            raise ConfigError(f"{self.where}: missing {key} (a list of integers in [{lo}, {hi}])")
        value = self.cfg[key]
        n = f"{length} " if length is not None else ""
        if (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_LEVELS
                or (length is not None and len(value) != length)
                or not all(_is_int(v) and lo <= v <= hi for v in value)):
            raise self.fail(key, f"it must be a list of {n}integers in [{lo}, {hi}]")
        return tuple(value)

    def int_or_list(self, key: str, default: int | None, lo: int, hi: int,
                    length: int) -> tuple[int, ...] | None:
        """An integer for every level, or a list of one per level (diffusers accepts both)."""
        value = self.cfg.get(key)
        if value is None:
            return None if default is None else (default,) * length
        if _is_int(value) and lo <= value <= hi:
            return (value,) * length
        if (isinstance(value, (list, tuple)) and len(value) == length
                and all(_is_int(v) and lo <= v <= hi for v in value)):
            return tuple(value)
        raise self.fail(key, f"it must be an integer in [{lo}, {hi}] or a list of {length}")

    def number(self, key: str, *, positive: bool, optional: bool = True) -> float | None:
        value = self.cfg.get(key)
        if value is None and optional:
            return None
        if (not _is_number(value) or not math.isfinite(value)
                or (positive and not value > 0)):
            raise self.fail(key, "it must be a finite number" + (" > 0" if positive else ""))
        return float(value)

    def names(self, key: str, length: int) -> None:
        value = self.cfg.get(key)
        if value is None:
            return
        if (not isinstance(value, (list, tuple)) or len(value) != length
                or not all(isinstance(v, str) and v for v in value)):
            raise self.fail(key, f"it must be a list of {length} block names (one per level)")

    def choice(self, key: str, valid: tuple) -> None:
        if key in self.cfg and self.cfg[key] not in valid:
            raise self.fail(key, f"valid values: {', '.join(map(str, valid))}")

    def string(self, key: str) -> None:
        if key in self.cfg and not (isinstance(self.cfg[key], str) and self.cfg[key]):
            raise self.fail(key, "it must be a non-empty string")


def _is_int(v: Any) -> bool:
    # JSON `true` is a Python bool, which is an int subclass; 2.0 is a float. Neither is a count.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_groups(f: _Fields, widths: tuple[int, ...], default: int) -> int:
    # GroupNorm splits each level's channels into norm_num_groups equal groups.
    groups = f.int("norm_num_groups", default, 1, MAX_WIDTH)
    bad = [w for w in widths if w % groups]
    if bad:
        raise f.fail("norm_num_groups", f"it must divide every block width, and {bad[0]} is not a "
                                        f"multiple of {groups}")
    return groups


def check_unet_config(cfg: Mapping[str, Any], where: str = "unet config") -> dict:
    """The UNet2DConditionModel fields; returns what the engine uses of them."""
    f = _Fields(cfg, where)
    widths = f.int_list("block_out_channels", 1, MAX_WIDTH)
    n = len(widths)
    f.names("down_block_types", n)
    f.names("up_block_types", n)
    layers = f.int_or_list("layers_per_block", 2, 1, MAX_LAYERS, n)
    in_ch = f.int("in_channels", 4, 1, MAX_CHANNELS)
    out_ch = f.int("out_channels", 4, 1, MAX_CHANNELS)
    sample = f.int("sample_size", None, 1, MAX_SAMPLE_SIZE)
    cross = f.int_or_list("cross_attention_dim", None, 1, MAX_WIDTH, n)
    if cross is None:
        raise ConfigError(f"{where}: missing cross_attention_dim (the text states' width)")
    # diffusers' historical naming: attention_head_dim is the number of heads unless
    # num_attention_heads is given. Either way each level needs at least one channel per head.
    heads = (f.int_or_list("num_attention_heads", None, 1, MAX_WIDTH, n)
             or f.int_or_list("attention_head_dim", 8, 1, MAX_WIDTH, n))
    for level, (w, h) in enumerate(zip(widths, heads)):
        if h > w:
            raise ConfigError(f"{where}: {h} attention heads at level {level} exceed its "
                              f"{w} channels")
    f.int_or_list("transformer_layers_per_block", 1, 1, MAX_LAYERS, n)
    f.int("encoder_hid_dim", 0, 0, MAX_WIDTH)
    _check_groups(f, widths, 32)
    f.number("norm_eps", positive=True)
    f.choice("use_linear_projection", (True, False))
    f.string("act_fn")
    return {"widths": widths, "layers": layers, "in_channels": in_ch, "out_channels": out_ch,
            "sample_size": sample, "cross_attention_dim": cross,
            "encoder_hid_dim": cfg.get("encoder_hid_dim")}


def check_vae_config(cfg: Mapping[str, Any], where: str = "vae config") -> dict:
    """The AutoencoderKL fields; returns what the engine uses of them."""
    f = _Fields(cfg, where)
    widths = f.int_list("block_out_channels", 1, MAX_WIDTH)
    n = len(widths)
    f.names("down_block_types", n)
    f.names("up_block_types", n)
    layers = f.int("layers_per_block", 1, 1, MAX_LAYERS)
    f.int("in_channels", 3, 1, MAX_CHANNELS)
    f.int("out_channels", 3, 1, MAX_CHANNELS)
    latent = f.int("latent_channels", 4, 1, MAX_CHANNELS)
    # The VAE's sample_size (pixels) is only a default for tiling; diffusers allows a pair too.
    f.int_or_list("sample_size", None, 1, MAX_SAMPLE_SIZE * 64, 2)
    _check_groups(f, widths, 32)
    # Latents are z * scaling_factor (+ shift); decoding divides by it, so it must be non-zero.
    f.number("scaling_factor", positive=True)
    f.number("shift_factor", positive=False)
    for key in ("force_upcast", "use_quant_conv", "use_post_quant_conv"):
        f.choice(key, (True, False))
    f.string("act_fn")
    return {"widths": widths, "layers": layers, "latent_channels": latent,
            "factor": 2 ** (n - 1)}


def check_text_config(cfg: Mapping[str, Any], where: str = "text encoder config") -> dict:
    """The CLIPTextConfig fields; returns what the engine uses of them."""
    f = _Fields(cfg, where)
    # transformers' CLIPTextConfig defaults (hidden 512, 8 heads, ...) are no SD text encoder's.
    hidden = f.int("hidden_size", None, 1, MAX_WIDTH)
    heads = f.int("num_attention_heads", 8, 1, MAX_WIDTH)
    if hidden % heads:
        raise f.fail("num_attention_heads", f"it must divide hidden_size={hidden}")
    f.int("intermediate_size", 2048, 1, 8 * MAX_WIDTH)
    f.int("num_hidden_layers", 12, 1, MAX_TEXT_LAYERS)
    vocab = f.int("vocab_size", CLIP_VOCAB_SIZE, CLIP_VOCAB_SIZE, MAX_VOCAB)
    f.int("max_position_embeddings", TOKENS_PER_PROMPT, TOKENS_PER_PROMPT, MAX_POSITIONS)
    f.int("projection_dim", 512, 1, MAX_WIDTH)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if cfg.get(key) is not None:
            f.int(key, None, 0, vocab - 1)
    f.number("layer_norm_eps", positive=True)
    f.string("hidden_act")
    return {"hidden_size": hidden}


def check_scheduler_config(cfg: Mapping[str, Any],
                           where: str = "scheduler config") -> None:
    """Bounds the schedule's length; ScheduleConfig.from_dict checks the rest."""
    _Fields(cfg, where).int("num_train_timesteps", 1000, 1, MAX_TRAIN_TIMESTEPS)


def check_model_configs(unet: Mapping[str, Any], vae: Mapping[str, Any],
                        text: Mapping[str, Any], *,
                        where: Mapping[str, str] | None = None) -> ModelShape:
    """All three configs, and that they fit together; where names each one in messages."""
    where = {"unet": "unet config", "vae": "vae config", "text_encoder": "text encoder config",
             **(where or {})}
    u = check_unet_config(unet, where["unet"])
    v = check_vae_config(vae, where["vae"])
    t = check_text_config(text, where["text_encoder"])
    # The UNet's cross-attention reads the text encoder's last hidden states (B, 77, hidden),
    # through an extra projection when encoder_hid_dim is set.
    key, reads = (("encoder_hid_dim", (u["encoder_hid_dim"],)) if u["encoder_hid_dim"]
                  else ("cross_attention_dim", u["cross_attention_dim"]))
    if any(width != t["hidden_size"] for width in reads):
        raise ConfigError(f"{where['unet']}: {key}={unet[key]!r} does not match the text "
                          f"encoder's hidden_size={t['hidden_size']}")
    # The UNet denoises VAE latents: it predicts latent_channels, and reads them (plus, for
    # inpainting/depth/pix2pix variants, conditioning channels stacked after them).
    if u["out_channels"] != v["latent_channels"]:
        raise ConfigError(f"{where['unet']}: out_channels={u['out_channels']} does not match the "
                          f"VAE's latent_channels={v['latent_channels']}")
    if u["in_channels"] < v["latent_channels"]:
        raise ConfigError(f"{where['unet']}: in_channels={u['in_channels']} is fewer than the "
                          f"VAE's latent_channels={v['latent_channels']}")
    return ModelShape(vae_factor=v["factor"], sample_size=u["sample_size"],
                      latent_channels=v["latent_channels"], unet_in_channels=u["in_channels"],
                      unet_widths=u["widths"], unet_layers=u["layers"], vae_widths=v["widths"],
                      vae_layers=v["layers"], text_hidden_size=t["hidden_size"])
