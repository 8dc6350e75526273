"""How large one generation may be: limits from the model's native size and from free memory.

Two kinds of request fail badly rather than with an error: one too large for memory (a 137 GB
allocation for ``--height 2147483648``, or the kernel's OOM killer), and one so far beyond the
model's native size that it runs for hours and draws nothing useful (the UNet's self-attention
costs grow with the square of the latent area). Both are refused before any compute:

- size: each side at most MAX_SIDE_FACTOR times the model's native side and the area at most
  MAX_AREA_FACTOR times its native area (SD-1.5: 4096 px and 2048 x 2048; the bundled 64 px model:
  512 px and 256 x 256), at most MAX_IMAGES images per call;
- memory: the estimated peak of the generation (estimate_bytes) must fit in the memory available
  now (RAM and cgroup limit on the CPU, free memory on a CUDA device).

``allow_large=True`` (``ldm generate --no-size-limit``) lifts the size limits and compares the
estimate with the device's *total* memory instead, so a request that cannot fit even on an idle
machine is still refused with an error rather than a crash.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .config_check import ModelShape
from .errors import UserInputError

MAX_SIDE_FACTOR = 8
MAX_AREA_FACTOR = 16
MAX_IMAGES = 64
OVERRIDE_HINT = "pass --no-size-limit (Python: allow_large=True) to try anyway"


class SizeLimitError(UserInputError):
    """A request beyond the model's size limits or the memory available."""


@dataclass(frozen=True)
class Memory:
    available: int                # bytes free now
    total: int                    # bytes the device has at all (or the cgroup allows)
    where: str                    # "RAM" / "cuda:0 memory", for messages


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    return out


def _cgroup_room() -> tuple[int, int] | None:
    """(limit, limit - usage) of this process's cgroup v2 memory controller, if it has a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next(line.strip().split(":", 2)[2] for line in f if line.startswith("0::"))
        base = "/sys/fs/cgroup" + rel.rstrip("/")
        with open(os.path.join(base, "memory.max")) as f:
            limit = f.read().strip()
        with open(os.path.join(base, "memory.current")) as f:
            usage = int(f.read())
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    if not limit.isdigit():                     # "max": no limit
        return None
    return int(limit), max(0, int(limit) - usage)


def cpu_memory() -> Memory | None:
    """Free RAM (MemAvailable, bounded by the cgroup's limit); None where it cannot be read."""
    try:
        info = _meminfo()
        available, total = info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError):
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            available = os.sysconf("SC_AVPHYS_PAGES") * page
            total = os.sysconf("SC_PHYS_PAGES") * page
        except (ValueError, OSError, AttributeError):
            return None
    room = _cgroup_room()
    if room is not None:
        total, available = min(total, room[0]), min(available, room[1])
    return Memory(available=available, total=total, where="RAM")


def device_memory(device) -> Memory | None:
    """Memory of a torch device: free/total of a CUDA device, else the machine's RAM."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return Memory(available=free, total=total, where=f"{device} memory")
    return cpu_memory()


def estimate_bytes(shape: ModelShape, *, height: int, width: int, num_images: int,
                   guided: bool, dtype_bytes: int, vae_dtype_bytes: int,
                   vae_tile: int | None = None) -> int:
    """An estimate of a generation's peak activation memory, in bytes.

    Inference keeps no autograd graph, so what is alive at the peak is
    - in the UNet (batch B = 2n with guidance: cond and uncond in one call): the skip connections
      the down path leaves for the up path, (L_i + 1) maps of C_i x p / 4^i at level i for p
      latent pixels, plus the working tensors of the widest block (a transformer block's
      feed-forward widens to 8 C for GEGLU: about 16 maps of C x p all told). Attention runs
      through SDPA's flash/memory-efficient kernels, O(p) not O(p^2) in memory;
    - in the VAE decoder (batch n), at the full resolution P = H W: a resnet's input, norm, conv
      and shortcut outputs, about 5 maps of the level's width (with tiling, P is one tile's
      area: vae_tile x vae_tile pixels at most);
    - the outputs: fp32 pixels a few times over and the uint8 images.
    The weights are not included: they are loaded (and counted as used memory) already.
    Measured against the rise of peak RSS at 512 x 512, 2 guided images, on the CPU: bundled
    model fp32 495 MB (estimate 693), bf16 454 MB (358); tiny SD-1-shaped model fp32 389 MB (358).
    """
    f = shape.vae_factor
    p = (height // f) * (width // f)
    batch = num_images * (2 if guided else 1)
    skips = sum((layers + 1) * c * p // 4 ** i
                for i, (c, layers) in enumerate(zip(shape.unet_widths, shape.unet_layers)))
    widest = max(c * p // 4 ** i for i, c in enumerate(shape.unet_widths))
    unet = batch * dtype_bytes * (skips + 16 * widest)
    pixels = height * width
    decoded = pixels if vae_tile is None else min(height, vae_tile) * min(width, vae_tile)
    vae_widths = shape.vae_widths
    vae_peak = max(max(vae_widths[i:i + 2]) * decoded // 4 ** i for i in range(len(vae_widths)))
    vae = num_images * vae_dtype_bytes * 5 * vae_peak
    outputs = num_images * pixels * (3 * 4 * 3 + 6)
    return max(unet, vae) + outputs


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check_size(shape: ModelShape, *, height: int, width: int, num_images: int,
               allow_large: bool = False) -> None:
    """The size limits that need no memory reading (so the CLI can check before loading)."""
    if allow_large:
        return
    native = shape.native_side
    max_side = MAX_SIDE_FACTOR * native
    for name, side in (("height", height), ("width", width)):
        if side > max_side:
            raise SizeLimitError(
                f"{name} {side} is more than {MAX_SIDE_FACTOR}x this model's native size of "
                f"{native} px (at most {max_side}); {OVERRIDE_HINT}")
    if height * width > MAX_AREA_FACTOR * native * native:
        raise SizeLimitError(
            f"{width}x{height} is more than {MAX_AREA_FACTOR}x this model's native area of "
            f"{native}x{native} px; {OVERRIDE_HINT}")
    if num_images > MAX_IMAGES:
        raise SizeLimitError(f"{num_images} images in one call is more than {MAX_IMAGES}; make "
                             f"them in several runs (with --seed), or {OVERRIDE_HINT}")


def check_memory(shape: ModelShape, memory: Memory | None, *, height: int, width: int,
                 num_images: int, guided: bool, dtype_bytes: int, vae_dtype_bytes: int,
                 vae_tile: int | None = None, allow_large: bool = False) -> None:
    """Refuse a generation whose estimated peak exceeds the memory available (with allow_large:
    the device's total memory, which no waiting can make room beyond)."""
    if memory is None:
        return
    need = estimate_bytes(shape, height=height, width=width, num_images=num_images,
                          guided=guided, dtype_bytes=dtype_bytes, vae_dtype_bytes=vae_dtype_bytes,
                          vae_tile=vae_tile)
    room = memory.total if allow_large else memory.available
    if need > room:
        what = (f"{num_images} image{'s' if num_images > 1 else ''} of {width}x{height}")
        if allow_large:
            raise SizeLimitError(f"{what} need about {_gb(need)} of working memory, more than "
                                 f"the {_gb(room)} of {memory.where} this machine has")
        raise SizeLimitError(f"{what} need about {_gb(need)} of working memory, more than the "
                             f"{_gb(room)} of {memory.where} free now; make fewer or smaller "
                             f"images, or {OVERRIDE_HINT}")
