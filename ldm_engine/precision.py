"""Where and in what precision to run: the `--device` / `--dtype` choices and what `auto` means.

`auto` is decided by what the hardware computes natively, because that is where the speed is:
- CUDA: fp16 (tensor cores; every SD-1.x UNet is trained to stay within fp16 range, and the VAE,
  which is not, is guarded separately by the pipeline's decode).
- CPU with AVX512-BF16 or AMX-BF16: bf16. The matmul units run about 4x the fp32 rate, and bf16
  keeps fp32's exponent range, so activations cannot overflow.
- anything else: fp32. Emulated bf16 and fp16 are slower than fp32 on such CPUs.
"""

from __future__ import annotations

import functools
import platform
import warnings
from pathlib import Path

import torch

from .errors import UserInputError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", *DTYPES)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16).

    torch's own `mkldnn._is_mkldnn_bf16_supported` is true on any AVX-512 CPU, where bf16 is
    merely emulated, so the kernel's CPU flags are read instead.
    """
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise UserInputError(f"unknown device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"device {name!r} asked for, but this torch sees no CUDA GPU "
                             f"(torch {torch.__version__})")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        dtype = name
    elif name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    elif name in DTYPES:
        dtype = DTYPES[name]
    else:
        raise UserInputError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    if dtype not in DTYPES.values():
        raise UserInputError(f"unsupported dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if dtype == torch.float16 and device.type == "cpu":
        warnings.warn("fp16 on the CPU has no fast kernels and runs far slower than fp32; "
                      "use bf16 (or auto)", stacklevel=3)
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)
