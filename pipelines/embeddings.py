"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): learned input
vectors of the text encoder that a word in the prompt stands for.

Three file layouts are read, as AUTOMATIC1111 and diffusers write them:

- A1111 ``.pt``: ``{"string_to_param": {"*": (n, D)}, "name": ..., ...}``, read only through the
  checkpoint converter's safe unpickler (ldm_engine.convert.ckpt.load_pickle: an allowlist of
  tensor-rebuilding globals, nothing else is ever imported or called);
- A1111 ``.safetensors``: ``{"emb_params": (n, D)}``;
- diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{"<token>": (D,) or (n, D)}``.

The word that stands for an embedding is the name given, else a diffusers file's own token,
else the file's stem (A1111: the file name). In a prompt it is found as A1111 finds it, by its
CLIP tokens (so case-insensitively), and replaced by its n vectors, which take n of a window's 75
positions and the word's attention weight; an embedding that does not fit in what is left of a
window starts the next one (see pipelines.prompts.prompt_windows).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_engine.errors import UserInputError

MAX_VECTORS = 75            # one window


@dataclass(frozen=True, eq=False)
class Embedding:
    name: str
    vectors: torch.Tensor   # (n, D) float32 on the CPU, a private copy never written to

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])


def _vectors(data: object, path: Path) -> tuple[str | None, torch.Tensor]:
    """(a diffusers file's token or None, the (n, D) tensor) of a loaded embedding file."""
    if not isinstance(data, Mapping):
        raise UserInputError(f"{path}: not a textual-inversion embedding (holds a "
                             f"{type(data).__name__})")
    if "string_to_param" in data:                                   # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise UserInputError(f"{path}: string_to_param must hold exactly one tensor")
        return None, next(iter(params.values()))
    if "emb_params" in data:                                        # A1111 .safetensors
        return None, data["emb_params"]
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1 and len(data) == 1:                        # diffusers learned_embeds
        token, value = next(iter(tensors.items()))
        return str(token), value
    raise UserInputError(f"{path}: not a textual-inversion embedding (no string_to_param, "
                         "emb_params or single-token table)")


def load_embedding(path: str | os.PathLike, *, name: str | None = None,
                   dim: int | None = None) -> Embedding:
    """The embedding in `path` (.pt, .bin, .safetensors), checked: (n, D) finite floats,
    1 <= n <= 75, D == `dim` (the text encoder's width) when given."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"embedding file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from ldm_engine.formats import read_safetensors
        data = read_safetensors(path)
    elif suffix in (".pt", ".bin", ".ckpt"):
        from ldm_engine.convert.ckpt import load_pickle
        data = load_pickle(path)                    # safe unpickler; refuses anything else
    else:
        raise UserInputError(f"{path}: embeddings are .pt, .bin or .safetensors files")
    token, vectors = _vectors(data, path)
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        raise UserInputError(f"{path}: the embedding is not a floating-point tensor")
    vectors = vectors.detach().to("cpu", torch.float32).clone()
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise UserInputError(f"{path}: an embedding is (vectors, width) with 1 to {MAX_VECTORS} "
                             f"vectors, got shape {tuple(vectors.shape)}")
    if dim is not None and vectors.shape[1] != dim:
        raise UserInputError(f"{path}: the embedding's vectors are {vectors.shape[1]} wide, this "
                             f"text encoder's are {dim}: it was trained for another model")
    if not torch.isfinite(vectors).all():
        raise UserInputError(f"{path}: the embedding holds inf/NaN")
    word = name if name is not None else token if token is not None else path.stem
    if not isinstance(word, str) or not word.strip():
        raise UserInputError(f"{path}: an embedding needs a non-empty name")
    return Embedding(word, vectors)
