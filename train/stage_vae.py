"""Stage 2: the first-stage autoencoder (Rombach et al. 2022, sec. 3.1), KL-regularised.

Loss = |x - D(z)|_1 + |x - D(z)|_2^2 + beta * KL(q(z|x) || N(0, I)), z ~ q(z|x). No adversarial
or perceptual term: both would need pretrained weights we cannot download, and flat-coloured
shapes are reconstructed sharply without them. After training, the latent scaling factor is set to
1 / std of the latents over the data, as SD's 0.18215 was, so diffusion sees unit-variance latents.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from ldm_engine.fsutil import atomic_dir

from .config import TrainConfig
from .data import ImageCaptionSet
from .runtime import Fit, autocast, cosine_with_warmup, psnr


def build_vae(config: TrainConfig) -> AutoencoderKL:
    v = config.vae
    levels = len(v.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=v.latent_channels,
                         block_out_channels=tuple(v.block_out_channels),
                         layers_per_block=v.layers_per_block, norm_num_groups=v.norm_num_groups,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         sample_size=config.data.size)


@torch.no_grad()
def latent_std(vae: AutoencoderKL, data: ImageCaptionSet, n: int = 1024) -> float:
    idx = torch.arange(min(n, len(data)))
    means = torch.cat([vae.encode(data.pixels(b)).latent_dist.mean for b in idx.split(128)])
    return means.std().item()


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, data: ImageCaptionSet, n: int = 256) -> float:
    """PSNR of mean-latent reconstructions of the last n images."""
    x = data.pixels(torch.arange(len(data) - min(n, len(data)), len(data)))
    rec = torch.cat([vae.decode(vae.encode(b).latent_dist.mean).sample for b in x.split(64)])
    return psnr(rec.clamp(-1, 1), x)


class VAEObjective(torch.nn.Module):
    """Encode, sample with the caller's noise, decode: one forward, so DDP sees the whole graph."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.vae.encode(x).latent_dist
        z = q.mean + q.std * eps.to(q.mean)          # reparameterised z ~ q(z|x)
        return self.vae.decode(z).sample, q.kl()


def train_vae(config: TrainConfig, accelerator: Accelerator, data: ImageCaptionSet) -> Path:
    """Train the autoencoder; write <output_dir>/vae/vae."""
    v = config.vae
    out = Path(config.output_dir) / "vae"
    torch.manual_seed(config.seed)
    vae = build_vae(config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=v.lr, weight_decay=0.0)
    scheduler = cosine_with_warmup(optimizer, v.warmup_steps, v.steps)
    model, optimizer = accelerator.prepare(VAEObjective(vae), optimizer)
    latent = config.data.size // 2 ** (len(v.block_out_channels) - 1)

    def draw(n, g):
        return {"eps": torch.randn((n, v.latent_channels, latent, latent), generator=g)}

    def loss(idx, draws):
        x = data.pixels(idx).to(accelerator.device)
        with autocast(accelerator, v.mixed_precision):
            rec, kl = model(x, draws["eps"].to(accelerator.device))
        err = rec.float() - x
        return err.abs().mean() + err.pow(2).mean() + v.kl_weight * kl.mean()

    Fit("vae", config, accelerator, model, optimizer, scheduler, v.steps, v.batch_size,
        len(data), draw=draw, loss=loss).run()

    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(model).vae.eval()
        quality = reconstruction_psnr(vae, data)
        vae.register_to_config(scaling_factor=round(1.0 / latent_std(vae, data), 5))
        with atomic_dir(out, overwrite=True) as tmp:
            vae.save_pretrained(tmp / "vae", safe_serialization=True)
        accelerator.log({"vae/psnr_db": quality})
        accelerator.print(f"[vae] reconstruction PSNR {quality:.2f} dB, "
                          f"scaling_factor {vae.config.scaling_factor}")
    accelerator.wait_for_everyone()
    return out
