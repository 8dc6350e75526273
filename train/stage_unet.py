"""Stage 3: the text-conditioned latent diffusion UNet (Rombach et al. 2022, eq. 2).

    L = E_{z, c, eps, t} [ w(t) * || target - model(z_t, t, tau(c)) ||^2 ],
    z_t = sqrt(alpha_bar_t) z + sqrt(1 - alpha_bar_t) eps,  target = eps or v (Salimans & Ho 2022)

with the caption replaced by "" 10 % of the time so the same network also learns the unconditional
model that classifier-free guidance needs, and the min-SNR-gamma weight (Hang et al. 2023)

    w(t) = min(SNR(t), gamma) / SNR(t)        (eps target)
    w(t) = min(SNR(t), gamma) / (SNR(t) + 1)  (v target),   SNR(t) = alpha_bar_t / (1 - alpha_bar_t)

With caching, images are encoded to latent distributions and captions to text states once (as
DALL-E mini pre-encoded its data) and every step only samples z ~ q(z|x) from the cached mean/std.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from PIL import Image
from transformers import CLIPTextModel

from ldm_engine.components import CLIP_TOWERS, Components, load_model, save_model
from ldm_engine.tokenizer import SDTokenizer
from pipelines import TextToImage
from schedulers import ScheduleConfig, add_noise, train_schedule, velocity

from .config import TrainConfig
from .data import ImageCaptionSet
from .runtime import Fit, autocast, cosine_with_warmup

SAVE_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Conditioning:
    text_encoder: CLIPTextModel
    tokenizer: SDTokenizer
    vae: AutoencoderKL
    unet: UNet2DConditionModel | None      # set when fine-tuning an existing model
    schedule: ScheduleConfig


def load_conditioning(config: TrainConfig) -> Conditioning:
    u = config.unet
    if u.init_from:
        c = load_model(u.init_from)
        schedule = ScheduleConfig.from_dict(c.schedule.to_dict() | {
            "prediction_type": u.prediction_type or c.schedule.prediction_type})
        if schedule.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{u.init_from} predicts {schedule.prediction_type!r}; the unet "
                             "stage trains epsilon or v_prediction (set unet.prediction_type)")
        return Conditioning(c.text_encoder, c.tokenizer, c.vae, c.unet, schedule)
    root = Path(config.output_dir)
    text = CLIPTextModel.from_pretrained(root / "clip/text_encoder", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(root / "vae/vae", local_files_only=True)
    tokenizer = SDTokenizer.from_folder(root / "clip/tokenizer")
    # Our own models sample with zero-terminal-SNR-free SD defaults: scaled-linear betas, leading
    # spacing with offset 1 -- exactly what diffusers' SD pipelines expect from the folder.
    schedule = ScheduleConfig(prediction_type=u.prediction_type or "epsilon")
    return Conditioning(text.eval(), tokenizer, vae.eval(), None, schedule)


def clip_towers(config: TrainConfig) -> Path | None:
    """Where the finished model's CLIP towers come from: the clip stage's output, or the folder
    being fine-tuned; none when the text encoder was trained here (the towers' text projection
    belongs to the old text tower, so their scores would no longer mean anything)."""
    u = config.unet
    if u.train_text_encoder:
        return None
    source = Path(u.init_from) if u.init_from else Path(config.output_dir) / "clip"
    return source if all((source / sub).is_dir() for sub in CLIP_TOWERS) else None


def build_unet(config: TrainConfig, cond: Conditioning) -> UNet2DConditionModel:
    u = config.unet
    factor = 2 ** (len(cond.vae.config.block_out_channels) - 1)
    return UNet2DConditionModel(
        sample_size=config.data.size // factor,
        in_channels=cond.vae.config.latent_channels, out_channels=cond.vae.config.latent_channels,
        block_out_channels=tuple(u.block_out_channels), layers_per_block=u.layers_per_block,
        cross_attention_dim=cond.text_encoder.config.hidden_size,
        attention_head_dim=u.attention_head_dim, down_block_types=tuple(u.down_block_types),
        up_block_types=tuple(u.up_block_types), norm_num_groups=32)


class Denoiser(torch.nn.Module):
    """UNet (and, when it is trained too, the text encoder) behind one forward, for DDP."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel | None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor | None = None,
                ids: torch.Tensor | None = None) -> torch.Tensor:
        if ids is not None:
            states = self.text_encoder(ids)[0]                       # (B, 77, D)
        return self.unet(z_t, t, encoder_hidden_states=states).sample


@torch.inference_mode()
def encode_cache(cond: Conditioning, data: ImageCaptionSet, batch: int = 256) -> dict:
    """Latent mean/std per image and text states per distinct caption (plus "" for dropout)."""
    means, stds = [], []
    for idx in torch.arange(len(data)).split(batch):
        q = cond.vae.encode(data.pixels(idx)).latent_dist
        means.append(q.mean)
        stds.append(q.std)
    unique = list(dict.fromkeys(data.captions))
    where = {t: k for k, t in enumerate(unique)}
    states = torch.cat([cond.text_encoder(cond.tokenizer(chunk))[0]
                        for chunk in np.array_split(np.array(unique + [""], dtype=object),
                                                    max(1, len(unique) // 512))])
    return {"mean": torch.cat(means), "std": torch.cat(stds), "states": states,
            "caption": torch.tensor([where[t] for t in data.captions]), "empty": len(unique)}


def snr_weight(alpha_bar: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    snr = alpha_bar / (1 - alpha_bar)
    if not gamma:
        return torch.ones_like(snr)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def train_unet(config: TrainConfig, accelerator: Accelerator, data: ImageCaptionSet) -> Path:
    """Train (or fine-tune) the UNet and write the finished diffusers folder to model_path."""
    u = config.unet
    if u.train_text_encoder and u.cache:
        raise ValueError("unet.train_text_encoder needs unet.cache=false: cached text states "
                         "would go stale as the encoder trains")
    cond = load_conditioning(config)
    torch.manual_seed(config.seed)
    unet = cond.unet if cond.unet is not None else build_unet(config, cond)
    if u.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    # Gradients are set explicitly for every network: a loaded model (init_from) comes back
    # frozen, as load_model returns inference-ready networks, and a fresh one trains everything.
    unet.train().requires_grad_(True)
    cond.vae.requires_grad_(False)
    cond.text_encoder.requires_grad_(u.train_text_encoder)
    text_encoder = cond.text_encoder.train() if u.train_text_encoder else None
    schedule = train_schedule(cond.schedule)
    alphas = schedule.alphas_cumprod
    objective = cond.schedule.prediction_type          # resolved: the config's or the model's
    sf = cond.vae.config.scaling_factor
    t0 = time.perf_counter()
    cache = encode_cache(cond, data) if u.cache else None
    if cache is not None:
        accelerator.print(f"[unet] cached {len(data)} latents and {len(cache['states'])} text "
                          f"states in {time.perf_counter() - t0:.1f} s")
    empty_ids = cond.tokenizer([""])

    model = Denoiser(unet, text_encoder)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=u.lr, weight_decay=1e-2)
    scheduler = cosine_with_warmup(optimizer, u.warmup_steps, u.steps)
    ema = EMAModel(unet.parameters(), decay=u.ema_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)
    device = accelerator.device
    # Latents of the training images, whatever size the UNet (e.g. a loaded one) was built for.
    factor = 2 ** (len(cond.vae.config.block_out_channels) - 1)
    shape = (cond.vae.config.latent_channels, data.images.shape[-2] // factor,
             data.images.shape[-1] // factor)
    T = cond.schedule.num_train_timesteps

    def draw(n, g):
        return {"t": torch.randint(0, T, (n,), generator=g),
                "noise": torch.randn((n, *shape), generator=g),
                "offset": torch.randn((n, shape[0], 1, 1), generator=g),
                "z_eps": torch.randn((n, *shape), generator=g),
                "drop": torch.rand((n,), generator=g) < u.caption_dropout}

    def loss(idx, d):
        d = {k: v.to(device) for k, v in d.items()}
        keep = ~d["drop"]
        if cache is not None:
            mean, std = cache["mean"][idx].to(device), cache["std"][idx].to(device)
            cap = torch.where(keep.cpu(), cache["caption"][idx], cache["empty"])
            extra = {"states": cache["states"][cap].to(device)}
        else:
            with torch.no_grad():
                q = cond.vae.encode(data.pixels(idx).to(device)).latent_dist
            mean, std = q.mean, q.std
            ids = cond.tokenizer([data.captions[i] if k else "" for i, k in
                                  zip(idx.tolist(), keep.tolist())]).to(device)
            if text_encoder is None:
                with torch.no_grad():
                    extra = {"states": cond.text_encoder(ids)[0]}
            else:
                extra = {"ids": ids}
        z = (mean + std * d["z_eps"]) * sf
        noise = d["noise"] + u.offset_noise * d["offset"]
        z_t = add_noise(schedule, z, noise, d["t"])
        target = noise if objective == "epsilon" else velocity(schedule, z, noise, d["t"])
        with autocast(accelerator, u.mixed_precision):
            pred = model(z_t, d["t"], **extra)
        per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        w = snr_weight(alphas.to(device)[d["t"]], u.min_snr_gamma, objective)
        return (w * per_sample).mean()

    def after_step(step: int) -> None:
        ema.step(accelerator.unwrap_model(model).unet.parameters())
        done = step + 1
        if config.sample_every and done % config.sample_every == 0 and accelerator.is_main_process:
            log_samples(config, accelerator, ema, accelerator.unwrap_model(model).unet, cond, done)

    fit = Fit("unet", config, accelerator, model, optimizer, scheduler, u.steps, u.batch_size,
              len(data), draw=draw, loss=loss, after_step=after_step, extra_state=[ema],
              grad_accum=u.grad_accum)
    fit.run()

    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model)
        final = copy.deepcopy(trained.unet).eval()
        ema.copy_to(final.parameters())
        text = trained.text_encoder if trained.text_encoder is not None else cond.text_encoder
        components = Components(final, cond.vae, text.eval(), cond.tokenizer, cond.schedule)
        save_model(components, config.model_path, overwrite=True,
                   dtype=SAVE_DTYPES[config.save_dtype], clip_from=clip_towers(config))
        accelerator.print(f"[unet] wrote {config.model_path}")
    accelerator.wait_for_everyone()
    return config.model_path


@torch.no_grad()
def log_samples(config: TrainConfig, accelerator: Accelerator, ema: EMAModel,
                unet: UNet2DConditionModel, cond: Conditioning, step: int) -> None:
    """A grid from the validation prompts with the EMA weights, to TensorBoard and samples/."""
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    unet.eval()
    try:
        pipe = TextToImage(Components(unet, cond.vae, cond.text_encoder, cond.tokenizer,
                                      cond.schedule))
        res = pipe(list(config.validation_prompts), num_inference_steps=25, guidance_scale=5.0,
                   seed=0, progress=False)
    finally:
        unet.train()
        ema.restore(unet.parameters())
    tracker = accelerator.get_tracker("tensorboard", unwrap=False)
    tracker.log_images({"unet/samples": res.pixels.numpy()}, step=step)
    grid = np.concatenate([np.asarray(im) for im in res.images], axis=1)
    out = Path(config.output_dir) / "samples" / f"step-{step:06d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out)
