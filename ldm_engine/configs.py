"""Typed, frozen configs for the model families the engine knows.

A family fixes the architecture of the three networks (built from diffusers' ``UNet2DConditionModel``
and ``AutoencoderKL`` and transformers' ``CLIPTextModel``; we never re-implement them), the
tokenizer's padding convention, and the training noise schedule. On disk a model is a diffusers
folder whose ``config.json`` files are the source of truth; these dataclasses are what we build new
models from and what we recognise loaded ones by.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from schedulers import ScheduleConfig

FamilyName = Literal["sd1", "sd2", "tiny"]
DownBlock = Literal["CrossAttnDownBlock2D", "DownBlock2D"]
UpBlock = Literal["CrossAttnUpBlock2D", "UpBlock2D"]
VaeDownBlock = Literal["DownEncoderBlock2D"]
VaeUpBlock = Literal["UpDecoderBlock2D"]


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """The denoiser eps_theta(z_t, t, c): a U-Net over latents with cross-attention to text states."""

    # Latent side length the model was trained at (image side / VAE factor); only a default.
    sample_size: int = 64
    # SD latents have 4 channels; 9-channel inpainting UNets add mask (1) + masked-image latents (4).
    in_channels: int = 4
    out_channels: int = 4
    # Channel width per resolution level; each level after the first halves the spatial size.
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # Width of the text states the attention layers read: the text encoder's hidden size.
    cross_attention_dim: int = 768
    # diffusers' historical name: in SD-1.x this is the number of heads (8), in SD-2.x the head
    # width per level (5, 10, 20, 20) -- the value is passed through unchanged either way.
    attention_head_dim: int | tuple[int, ...] = 8
    # The deepest level has no attention in SD (the 8x8 map at 512 px is cheap to skip).
    down_block_types: tuple[DownBlock, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[UpBlock, ...] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    # GroupNorm groups must divide every width; 32 is what SD uses.
    norm_num_groups: int = 32
    # SD-2.x replaced the 1x1 conv projections around the transformer blocks by Linear layers.
    use_linear_projection: bool = False

    def to_diffusers(self) -> dict:
        kw = dataclasses.asdict(self)
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            kw[key] = list(kw[key])
        if isinstance(kw["attention_head_dim"], tuple):
            kw["attention_head_dim"] = list(kw["attention_head_dim"])
        return kw


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """The first stage: a KL-regularised autoencoder mapping images to latents (Rombach et al. 2022)."""

    sample_size: int = 512
    in_channels: int = 3
    out_channels: int = 3
    # Each level after the first downsamples by 2: four levels give SD's 8x spatial factor.
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    # Latents are multiplied by this before diffusion so they have roughly unit variance
    # (0.18215 was measured on SD-1.x's VAE over its training set).
    scaling_factor: float = 0.18215
    down_block_types: tuple[VaeDownBlock, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[VaeUpBlock, ...] = ("UpDecoderBlock2D",) * 4

    def to_diffusers(self) -> dict:
        kw = dataclasses.asdict(self)
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            kw[key] = list(kw[key])
        return kw

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True, kw_only=True)
class TextEncoderConfig:
    """A CLIP text transformer; its last hidden states (B, 77, hidden) condition the UNet."""

    # CLIP's BPE vocabulary: 256 byte symbols, their 256 end-of-word forms, 48,894 merges, BOS, EOS.
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    # CLIP's context: 75 text tokens between BOS and EOS.
    max_position_embeddings: int = 77
    # OpenAI CLIP used x * sigmoid(1.702 x); OpenCLIP ViT-H (SD-2.x) uses exact GELU.
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    # Real token ids (not SD-1.5's historical 0/2/1) so the pooled output finds the EOS token.
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407

    def to_transformers(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class ModelFamily:
    name: FamilyName
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # SD-1.x (OpenAI CLIP tokenizer) pads with <|endoftext|>; SD-2.x (OpenCLIP) pads with id 0.
    tokenizer_pad: Literal["eos", "zero"] = "eos"

    @property
    def vae_factor(self) -> int:
        return self.vae.downsample_factor


SD1 = ModelFamily(
    name="sd1",
    unet=UNetConfig(),
    vae=VAEConfig(),
    text_encoder=TextEncoderConfig(),
)

SD2 = ModelFamily(
    name="sd2",
    unet=UNetConfig(
        sample_size=96,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
    ),
    vae=VAEConfig(sample_size=768),
    # OpenCLIP ViT-H/14 text tower; SD-2.x conditions on its penultimate layer, which is why the
    # diffusers folder stores 23 of its 24 layers.
    text_encoder=TextEncoderConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        hidden_act="gelu",
        projection_dim=512,
        pad_token_id=0,
    ),
    schedule=ScheduleConfig(prediction_type="v_prediction"),
    tokenizer_pad="zero",
)

# The SD-1.x architecture at toy widths: same block types and 8x VAE, small enough that a full
# pipeline run takes well under a second on 2 CPU cores. Used by tests.
TINY = ModelFamily(
    name="tiny",
    unet=UNetConfig(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    vae=VAEConfig(
        sample_size=64,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
    ),
    text_encoder=TextEncoderConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
    ),
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD1, SD2, TINY)}


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown model family {name!r}; valid families: {', '.join(FAMILIES)}") from None
