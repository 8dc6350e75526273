"""Image-caption data: the synthetic shapes world or a Hugging Face imagefolder, held in memory.

Training sets here are small (tens of thousands of 64 px images), so the whole set is decoded once
into a uint8 tensor (N, 3, S, S) and batches are plain index lookups -- no DataLoader workers,
which on 2 cores would compete with the training step for the same cores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from PIL import Image

from ldm_engine.fsutil import atomic_path

from .config import DataConfig
from .shapes import generate

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class ImageCaptionSet:
    images: torch.Tensor      # (N, 3, S, S) uint8
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def pixels(self, index: torch.Tensor) -> torch.Tensor:
        """Images at `index` as float in [-1, 1], the range the VAE works in."""
        return self.images[index].float() / 127.5 - 1.0


def square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size`, then centre-crop to size x size."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                         Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _stack(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])      # (N, S, S, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def read_imagefolder(root: str | Path, size: int) -> ImageCaptionSet:
    """The imagefolder convention: metadata.jsonl ({"file_name", "text"} per line), else a .txt
    caption beside each image."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    pairs: list[tuple[Path, str]] = []
    meta = root / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((root / row["file_name"], str(row["text"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{meta}:{n}: expected {{'file_name', 'text'}}: {e}") from None
    else:
        for image_path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            sidecar = image_path.with_suffix(".txt")
            if sidecar.is_file():
                pairs.append((image_path, sidecar.read_text(encoding="utf-8").strip()))
    if not pairs:
        raise ValueError(f"{root} holds no captioned images (metadata.jsonl or .txt sidecars)")
    images = []
    for path, _ in pairs:
        if not path.is_file():
            raise FileNotFoundError(f"{meta}: listed image is missing: {path}")
        with Image.open(path) as im:
            images.append(square(im, size))
    return ImageCaptionSet(_stack(images), [text for _, text in pairs])


def shapes_set(n: int, seed: int, size: int) -> ImageCaptionSet:
    images, captions = [], []
    for image, text, _ in generate(n, seed, split="train", size=size):
        images.append(image)
        captions.append(text)
    return ImageCaptionSet(_stack(images), captions)


def load_data(config: DataConfig, seed: int, cache_dir: Path | None = None) -> ImageCaptionSet:
    """The training set; the shapes world is rendered once and cached as safetensors + JSON."""
    if config.source == "imagefolder":
        return read_imagefolder(config.path, config.size)
    if cache_dir is None:
        return shapes_set(config.num_images, seed, config.size)
    stem = cache_dir / f"shapes-seed{seed}-n{config.num_images}-s{config.size}"
    tensors, captions = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if tensors.is_file() and captions.is_file():
        return ImageCaptionSet(safetensors.torch.load_file(str(tensors))["images"],
                               json.loads(captions.read_text()))
    data = shapes_set(config.num_images, seed, config.size)
    with atomic_path(tensors) as tmp:
        safetensors.torch.save_file({"images": data.images}, str(tmp))
    with atomic_path(captions) as tmp:
        tmp.write_text(json.dumps(data.captions))
    return data
