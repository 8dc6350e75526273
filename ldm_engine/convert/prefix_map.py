"""A two-way table of module-path renames, the building block of every key mapping here.

Most of the difference between the original LDM layout and diffusers' is *where* a module sits
(``input_blocks.4.0`` vs ``down_blocks.1.resnets.0``), not what is inside it: below a renamed
module the parameter names are the same in both. So a mapping is a list of (diffusers path,
LDM path) pairs and a key is renamed by its longest listed prefix. Built from the model config, the
table lists every module that exists, and a key that matches no entry is reported, never guessed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

# (diffusers key, tensor) -> tensor: a layout change that goes with a rename (e.g. conv <-> linear).
Reshape = Callable[[str, torch.Tensor], torch.Tensor]


class PrefixMap:
    """Rename keys between two layouts by longest matching module path (or whole key)."""

    def __init__(self, pairs: Iterable[tuple[str, str]]):
        self._to_ldm: dict[str, str] = {}
        self._to_diffusers: dict[str, str] = {}
        for diffusers_path, ldm_path in pairs:
            # A table that maps two modules onto one name would silently merge weights.
            if diffusers_path in self._to_ldm or ldm_path in self._to_diffusers:
                raise ValueError(f"duplicate mapping entry {diffusers_path!r} <-> {ldm_path!r}")
            self._to_ldm[diffusers_path] = ldm_path
            self._to_diffusers[ldm_path] = diffusers_path

    @staticmethod
    def _rename(key: str, table: dict[str, str]) -> str | None:
        parts = key.split(".")
        # Longest prefix first: the whole key (a bare Parameter such as OpenCLIP's
        # positional_embedding), then its module path, then that module's parents.
        for n in range(len(parts), 0, -1):
            head = ".".join(parts[:n])
            if head in table:
                return table[head] + key[len(head):]
        return None

    def to_ldm(self, key: str) -> str | None:
        return self._rename(key, self._to_ldm)

    def to_diffusers(self, key: str) -> str | None:
        return self._rename(key, self._to_diffusers)

    def rename_to_ldm(self, weights: Mapping[str, torch.Tensor], *, prefix: str, what: str,
                      reshape: Reshape | None = None) -> dict[str, torch.Tensor]:
        """A whole diffusers state dict -> ``prefix + LDM key``; unmapped keys are an error."""
        out, unmapped = {}, []
        for key, value in weights.items():
            ldm = self.to_ldm(key)
            if ldm is None:
                unmapped.append(key)
            else:
                out[prefix + ldm] = reshape(key, value) if reshape else value
        if unmapped:
            raise KeyError(f"{what} weights with no LDM name: {', '.join(unmapped[:5])}")
        return out

    def rename_to_diffusers(self, weights: Mapping[str, torch.Tensor], *, prefix: str, what: str,
                            reshape: Reshape | None = None) -> dict[str, torch.Tensor]:
        """``prefix + LDM key`` tensors -> a diffusers state dict; unmapped keys are an error."""
        out, unmapped = {}, []
        for key, value in weights.items():
            name = self.to_diffusers(key.removeprefix(prefix))
            if name is None:
                unmapped.append(key)
            else:
                out[name] = reshape(name, value) if reshape else value
        if unmapped:
            raise KeyError(f"{what} weights this architecture does not have: "
                           f"{', '.join(unmapped[:5])}")
        return out
