"""Training: CLIP -> VAE -> text-conditioned latent UNet, launched with `accelerate launch -m train`.

    from train import main, load_config
    main(load_config("train/configs/default.yaml", ["unet.steps=100"]))
"""

from __future__ import annotations

from pathlib import Path

from .config import TrainConfig, load_config


def main(config: TrainConfig) -> Path:
    """Run the configured stages in order; returns the finished model folder."""
    from .data import load_data
    from .runtime import make_accelerator
    from .stage_clip import train_clip
    from .stage_unet import train_unet
    from .stage_vae import train_vae

    accelerator = make_accelerator(config)
    with accelerator.main_process_first():
        data = load_data(config.data, config.seed, Path(config.output_dir) / "cache")
    stages = {"clip": train_clip, "vae": train_vae, "unet": train_unet}
    for name in config.stages:
        stages[name](config, accelerator, data)
    accelerator.end_training()
    return config.model_path


__all__ = ["TrainConfig", "load_config", "main"]
