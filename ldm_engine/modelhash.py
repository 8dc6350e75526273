"""A model's identity as AUTOMATIC1111 writes it in a PNG: the ``Model hash`` field.

A1111's hash of a checkpoint is the first 10 hex digits of the SHA-256 of the whole file (its
"shorthash"; before late 2022 it was an 8-digit hash of 64 KiB of the file, which this engine only
reads back, never computes). We define the same for our models:

- a single file (.safetensors, .ckpt): the SHA-256 of the file, so our hash of a checkpoint is
  exactly A1111's (and civitai's "AutoV2") for that file;
- a diffusers folder: the SHA-256 of its three weights files concatenated, in the fixed order UNet,
  VAE, text encoder, i.e. what this prints::

      cat unet/diffusion_pytorch_model.safetensors vae/diffusion_pytorch_model.safetensors \\
          text_encoder/model.safetensors | sha256sum | cut -c1-10

  The configs, tokenizer and scheduler files are not part of it: the hash names the weights.

The whole of every file is hashed (a sampled hash could miss a fine-tune that touched a few
tensors). SHA-256 runs at about 1.6 GB/s on one core here (SHA-NI), so an fp32 SD-1.5 folder
(4.3 GB) takes about 3 s and an fp16 one about half that, read straight from the page cache
the load just filled. Pipelines compute it once, lazily, the first time an image records it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .components import TEXT_WEIGHTS, UNET_WEIGHTS, VAE_WEIGHTS
from .errors import ModelFolderError

# The order the folder's files are fed to SHA-256 in; changing it changes every folder's hash.
FOLDER_WEIGHTS = (UNET_WEIGHTS, VAE_WEIGHTS, TEXT_WEIGHTS)
HASH_DIGITS = 10               # A1111's shorthash
_CHUNK = 8 << 20               # hashlib releases the GIL for each update of a large buffer


def model_files(path: str | os.PathLike) -> list[Path]:
    """The files whose bytes make a model's hash, in hashing order."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = [path / rel for rel in FOLDER_WEIGHTS]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ModelFolderError(f"cannot hash model {path}: missing {missing[0]}")
    return files


def model_sha256(path: str | os.PathLike) -> str:
    """The full SHA-256 (64 hex digits) of a model file or folder, as defined above."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    for file in model_files(path):
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                digest.update(view[:n])
    return digest.hexdigest()


def model_hash(path: str | os.PathLike) -> str:
    """A1111's ``Model hash``: the first 10 hex digits of model_sha256."""
    return model_sha256(path)[:HASH_DIGITS]
