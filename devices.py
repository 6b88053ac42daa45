"""Devices and precision: which device, which autocast, which convolutions, and the process's speed settings.

main.py, evaluate.py and tools/bench.py each call `set_up` once, before any work, so that
--amp and --conv mean the same everywhere and a setting that can't run stops with one line.
docs/speed.md has the measurements behind the choices.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform

import torch

from utils import UsageError, check

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("auto", "none", "bf16", "fp16")  # --amp; all but auto are precisions
CONVS = ("direct", "winograd")  # --conv: the cells' 5x5 convolutions


def _mps_available():
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def pick_device(name="auto"):
    """Return torch.device: "auto" picks cuda, then mps, then cpu; explicit names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise UsageError(f"--device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cpu":
        return device
    if device.type == "mps":
        if not _mps_available():
            raise UsageError(f"--device {name} requested but torch.backends.mps.is_available() is False")
        return device
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, ...
    if backend is None or not hasattr(backend, "is_available"):
        raise UsageError(f"--device {name} is not supported; use auto, cpu, cuda, cuda:N or mps")
    if not backend.is_available():
        raise UsageError(f"--device {name} requested but torch.{device.type}.is_available() is False")
    if device.index is not None and device.index >= backend.device_count():
        raise UsageError(f"--device {name} requested but only {backend.device_count()} "
                         f"{device.type} device(s) are visible")
    return device


# ---------------------------------------------------------------------------------------
# Precision and convolutions
# ---------------------------------------------------------------------------------------


def cpu_has_native_bf16() -> bool:
    """True where this CPU runs bf16 matrix math in hardware, so that bf16 beats fp32.

    oneDNN must say it can (torch.ops.mkldnn._is_mkldnn_bf16_supported), and on x86 the CPU
    must have AVX512-BF16 or AMX as well: oneDNN also says yes on AVX-512 CPUs without them,
    where it emulates bf16 more slowly than fp32. On Arm its answer is the BF16 extension
    itself. A probe this torch build lacks counts as no.
    """
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def resolve_amp(amp: str, device: torch.device) -> str:
    """The precision that --amp means on `device`: "none" (fp32), "bf16" or "fp16".

    auto is bf16 on CUDA GPUs that support it and on CPUs that run it natively
    (`cpu_has_native_bf16`: about 2x fp32's speed there, docs/speed.md), fp32 on other
    CPUs, where bf16 is emulated and many times slower than fp32. MPS stays fp32: its autocast is
    unmeasured here (tools/gpu_check.sh measures CUDA), and bf16 needs macOS 14 there, so
    fp32 is the one choice known to run, and to train as documented, on every Mac. A
    precision resolves to itself.
    """
    check(amp in AMP_CHOICES, f"--amp {amp!r}: use one of {', '.join(AMP_CHOICES)}")
    if amp == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "none"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "none"
    check(amp != "fp16" or device.type == "cuda",
          f"--amp fp16 needs a CUDA device, got {device.type}; use --amp bf16")
    return amp


def autocast_context(device: torch.device, precision: str):
    """torch.autocast for a resolved precision (bf16, fp16), a no-op for none."""
    if precision == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[resolve_amp(precision, device)])


def check_conv(conv: str, amp: str, precision: str) -> None:
    """--conv is one of CONVS, and Winograd runs in fp32 only (tools/winograd.py)."""
    check(conv in CONVS, f"--conv {conv!r}: use {' or '.join(CONVS)}")
    asked = amp if amp == precision else f"{amp} ({precision} here)"
    check(conv == "direct" or precision == "none",
          f"--conv {conv} runs in fp32 only, not under --amp {asked}; add --amp none")


def use_conv(model: torch.nn.Module, conv: str) -> int:
    """Give the model's cells the convolutions --conv names; returns how many were swapped.

    direct keeps the model as built. winograd swaps the cells' 5x5 convolutions for the
    opt-in Winograd F(4x4, 5x5) of tools/winograd.py, imported only then.
    """
    if conv == "direct":
        return 0
    from tools.winograd import use_winograd
    return use_winograd(model)


def set_up(device: torch.device, amp: str, conv: str, *, keep_freed: bool = True
           ) -> tuple[str, torch.memory_format]:
    """The one set-up of the entry points, before any work: --amp resolved for `device`,
    --conv checked against it, and this process's speed settings (`configure_process`).

    Returns (precision, the memory format for the model and its activations). Raises
    UsageError for a setting this device can't run. Calling it again is harmless.
    """
    precision = resolve_amp(amp, device)
    check_conv(conv, amp, precision)
    return precision, configure_process(device, keep_freed=keep_freed)


# ---------------------------------------------------------------------------------------
# Process-wide speed settings
# ---------------------------------------------------------------------------------------


def configure_process(device: torch.device, *, keep_freed: bool = True) -> torch.memory_format:
    """Process-wide speed settings for `device` (docs/speed.md has the measurements).
    Returns the memory format for the model and its activations."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times and keeps its fastest kernels
    if device.type == "cpu":
        if keep_freed:
            keep_freed_memory()  # no page faults on every step's big tensors: 4-8% faster steps
        return torch.channels_last  # oneDNN's convolutions: 2-3% faster end to end
    return torch.contiguous_format  # cuda, mps: channels_last is unmeasured (tools/gpu_check.sh)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it (Linux, CPU runs).

    By default every tensor over 32 MB is a fresh mmap, returned to the OS when freed, so
    each training step page-faults its big activations in again: about 2 GB of faults a
    step for convlstm, 4-8% of the step. M_MMAP_MAX = 0 serves all sizes from the heap
    and a high M_TRIM_THRESHOLD keeps the freed heap, so steps after the first reuse warm
    pages. Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 2**31 - 1))  # M_MMAP_MAX, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock timings are true (cuda, mps)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
