"""Time the real training step and say how close it runs to the machine's convolution speed.

    python tools/bench.py                                     # convlstm, batch 4, 10 -> 10 frames
    python tools/bench.py --arch convlstm,convgru --amp none,bf16 --json bench.json
    python tools/bench.py --conv direct,winograd --channels-last  # Winograd: fp32 only
    python tools/bench.py --arch trajgru --no-reference
    python tools/bench.py --layers [FLAGS]    # the layers per shape: tools/bench_layers.py

One row per --arch x --amp x --conv setting: the median time of training.train_step (forward,
loss, backward, clipping, Adam) after warm-up, GFLOP per step, the GFLOP/s of one large
convolution of the model's dominant shape (the roofline), peak memory, and the speed-up over
the textbook model of tools/textbook.py. docs/speed.md says how each figure is measured.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, to run as a script

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from checkpoints import write_rows
from devices import autocast_context, pick_device, set_up, synchronize, use_conv
from model import build_model
from net_params import get_preset
from tools.textbook import TEXTBOOK_CELLS, build_textbook
from training import grad_scaler, train_step
from utils import ArgumentParser, UsageError, check, format_table, run_cli


def add_shape_flags(p, arch: str, batch_size: int) -> None:
    """--arch, --batch-size, the frame counts and size, and --device: bench and amp_check."""
    p.add_argument("--arch", default=arch, metavar="NAMES",
                   help=f"preset(s) of net_params.py, comma-separated (default: {arch})")
    p.add_argument("--batch-size", type=int, default=batch_size, metavar="N",
                   help=f"(default: {batch_size})")
    p.add_argument("--frames-input", type=int, default=10, metavar="T", help="(default: 10)")
    p.add_argument("--frames-output", type=int, default=10, metavar="T", help="(default: 10)")
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="frame size (default: the preset's)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N or mps (default: auto)")


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_flags(p, arch="convlstm", batch_size=4)
    p.add_argument("--amp", default="auto", metavar="auto|none|bf16|fp16",
                   help="autocast precision(s), comma-separated; auto = bf16 on CUDA GPUs "
                        "that support it and on CPUs that run bf16 natively, else none "
                        "(default: auto)")
    p.add_argument("--conv", default="direct", metavar="direct|winograd",
                   help="cell convolutions, comma-separated; winograd needs --amp none "
                        "(default: direct)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    p.add_argument("--channels-last", action="store_true",
                   help="model and activations in channels_last (default: off)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's default of unmapping freed tensors over 32 MB (default: "
                        "keep them for reuse on the CPU, see devices.keep_freed_memory)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed steps (default: 1)")
    p.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="timed steps; the median is reported (default: 3)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip timing the slow textbook model (default: time it)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results there (one row: an object; several: "
                        "{\"runs\": [...]})")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="(default: 0)")
    p.add_argument("--layers", action="store_true",
                   help="time the ConvLSTM/ConvGRU layers per shape instead: runs "
                        "tools/bench_layers.py with the other flags (see its --help)")
    args = p.parse_args(argv)
    if min(args.batch_size, args.frames_input, args.frames_output, args.repeats) < 1 \
            or args.warmup < 0:
        p.error("need --batch-size, --frames-input, --frames-output, --repeats >= 1 "
                "and --warmup >= 0")
    return args


def _split(flag: str) -> list[str]:
    return [item.strip() for item in flag.split(",") if item.strip()]


# -----------------------------------------------------------------------------
# measuring

def _proc_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), None)
    except OSError:
        return None


def memory_baseline_kb() -> int:
    """The resident set after handing memory freed by earlier rows back to the OS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _proc_kb("VmRSS") or 0


def reset_peak_memory(device) -> bool:
    """Start a fresh peak; False where only the process's lifetime peak is known."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM, the peak resident set, to the current one
        return _proc_kb("VmHWM") is not None
    except OSError:
        return False


def peak_memory_mb(device, baseline_kb: int) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    peak_kb = _proc_kb("VmHWM")
    if peak_kb is None:  # ru_maxrss is KiB on Linux, bytes on macOS
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_kb //= 1024 if sys.platform == "darwin" else 1
    return (peak_kb - baseline_kb) / 1024


def time_steps(step, device, n: int) -> list[float]:
    """Seconds of each of n calls of step(), the device synchronised around each."""
    times = []
    for _ in range(n):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def count_step_flops(make_model, batch: int, frames_input: int, frames_output: int,
                     channels: int, size: int) -> int:
    """FLOPs of one step's forward and backward, counted on the meta device (no compute)."""
    with torch.device("meta"):
        model = make_model()
        inputs = torch.empty(batch, frames_input, channels, size, size)
        targets = torch.empty(batch, frames_output, channels, size, size)
    counter = FlopCounterMode(display=False)
    with counter:
        F.mse_loss(model(inputs, frames_output=frames_output), targets).backward()
    return counter.get_total_flops()


def roofline_gflops(device, amp: str, fmt, batch: int, in_channels: int, out_channels: int,
                    kernel: int, size: int, repeats: int) -> float:
    """GFLOP/s of one direct conv (batch, in, size, size) -> out, forward and backward."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    conv = conv.to(device, memory_format=fmt)
    x = torch.randn(batch, in_channels, size, size, generator=g).to(device, memory_format=fmt)
    x.requires_grad_(True)  # every state conv of the model passes a gradient back too
    with autocast_context(device, amp):
        y = conv(x)
    grad = torch.randn(y.shape, generator=g).to(device, y.dtype, memory_format=fmt)
    del y

    def step():
        with autocast_context(device, amp):
            y = conv(x)
        y.backward(grad)

    times = time_steps(step, device, 1 + repeats)[1:]
    flops = 3 * 2 * batch * size * size * out_channels * in_channels * kernel * kernel
    return flops / statistics.median(times) / 1e9


def time_training(model, device, amp: str, inputs, targets, args, lr: float) -> dict:
    """Time training.train_step with Adam; the GradScaler is on only for fp16."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scaler = grad_scaler(device, amp)

    def step():
        train_step(model, optimizer, scaler, inputs, targets, autocast_context(device, amp))

    first = time_steps(step, device, args.warmup)  # warm up (and compile) first
    exact = reset_peak_memory(device)
    times = time_steps(step, device, args.repeats)
    return {"step_s": statistics.median(times), "all_step_s": times,
            "first_step_s": first[0] if first else None, "exact_peak": exact}


def dominant_conv(model) -> tuple[int, int, int]:
    """(in, out, kernel) of the bottom encoder cell's costliest state-side convolution
    (the input convolutions run batched over time and are left out)."""
    convs = [m for name, m in model.encoder.stages[0].cell.named_modules()
             if isinstance(m, torch.nn.Conv2d) and "input" not in name]
    conv = max(convs, key=lambda c: c.in_channels * c.out_channels * c.kernel_size[0] ** 2)
    return conv.in_channels, conv.out_channels, conv.kernel_size[0]


def processor_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# -----------------------------------------------------------------------------
# one row

def run_row(args, arch: str, amp: str, conv: str, device, textbook_cache: dict) -> dict:
    preset = get_preset(arch)
    size = args.image_size or preset.image_size
    B, T_in, T_out = args.batch_size, args.frames_input, args.frames_output
    C = preset.frame_channels
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(args.seed)
    inputs = torch.rand(B, T_in, C, size, size, generator=g).to(device)
    targets = torch.rand(B, T_out, C, size, size, generator=g).to(device)

    def build():
        model = build_model(preset)
        use_conv(model, conv)
        return model

    baseline_kb = memory_baseline_kb()
    torch.manual_seed(args.seed)
    model = build_model(preset).to(device, memory_format=fmt)
    swapped = use_conv(model, conv)
    in_ch, out_ch, kernel = dominant_conv(model)
    runnable = torch.compile(model) if args.compile else model
    fast = time_training(runnable, device, amp, inputs, targets, args, preset.lr)
    peak_mb = peak_memory_mb(device, baseline_kb)
    del runnable, model

    # The model's work as direct convolutions compute it, the same for every --conv, so
    # GFLOP/s compare as seq/s do; what Winograd executes is counted apart.
    flops = count_step_flops(lambda: build_model(preset), B, T_in, T_out, C, size)
    executed = count_step_flops(build, B, T_in, T_out, C, size)
    bottom = size // preset.stages[0].down.stride
    roofline = roofline_gflops(device, amp, fmt, B * T_in, in_ch, out_ch, kernel, bottom,
                               repeats=max(2, min(args.repeats, 5)))

    textbook = None
    if not args.no_reference and preset.cell in TEXTBOOK_CELLS:
        if arch not in textbook_cache:  # fp32, NCHW, not compiled: as the original ran
            baseline_kb = memory_baseline_kb()
            torch.manual_seed(args.seed)
            timing = time_training(build_textbook(preset).to(device), device, "none",
                                   inputs, targets, args, preset.lr)
            timing["peak_mem_mb"] = peak_memory_mb(device, baseline_kb)
            timing["flops"] = count_step_flops(lambda: build_textbook(preset), B, T_in, T_out,
                                               C, size)
            textbook_cache[arch] = timing
        textbook = textbook_cache[arch]

    step_s = fast["step_s"]
    achieved = flops / step_s / 1e9
    row = {
        "arch": arch, "batch_size": B, "frames_input": T_in, "frames_output": T_out,
        "image_size": size, "amp": amp, "conv": conv, "compile": args.compile,
        "channels_last": args.channels_last, "device": str(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "processor": processor_name(device),
        "seq_per_s": B / step_s, "step_ms": 1e3 * step_s,
        "step_ms_all": [1e3 * t for t in fast["all_step_s"]],
        "first_step_ms": None if fast["first_step_s"] is None else 1e3 * fast["first_step_s"],
        "peak_mem_mb": peak_mb, "peak_mem_exact": fast["exact_peak"],
        "gflop_per_step": flops / 1e9, "executed_gflop_per_step": executed / 1e9,
        "achieved_gflops": achieved, "roofline_gflops": roofline,
        "roofline_conv": f"conv{kernel}x{kernel} {in_ch}->{out_ch} at "
                         f"{B * T_in}x{bottom}x{bottom}, fwd+bwd",
        "utilization": achieved / roofline,
        "reference_seq_per_s": None if textbook is None else B / textbook["step_s"],
        "reference_step_ms": None if textbook is None else 1e3 * textbook["step_s"],
        "reference_gflop_per_step": None if textbook is None else textbook["flops"] / 1e9,
        "reference_peak_mem_mb": None if textbook is None else textbook["peak_mem_mb"],
        "speedup": None if textbook is None else textbook["step_s"] / step_s,
    }
    if args.compile and fast["first_step_s"] is not None:
        row["compile_s"] = fast["first_step_s"] - step_s  # the first step's extra time
    note = f" (Winograd on {swapped} convolutions)" if conv == "winograd" else ""
    print(f"  {arch} {amp} {conv}: {row['step_ms']:.0f} ms/step{note}", flush=True)
    return row


# -----------------------------------------------------------------------------
# command line

COLUMNS = [("arch", "arch", "{}"), ("amp", "amp", "{}"), ("conv", "conv", "{}"),
           ("seq/s", "seq_per_s", "{:.3f}"), ("step ms", "step_ms", "{:.0f}"),
           ("GFLOP/step", "gflop_per_step", "{:.4g}"), ("GFLOP/s", "achieved_gflops", "{:.1f}"),
           ("roofline", "roofline_gflops", "{:.1f}"), ("util", "utilization", "{:.2f}"),
           ("peak MB", "peak_mem_mb", "{:.0f}"),
           ("textbook seq/s", "reference_seq_per_s", "{:.3f}"), ("speedup", "speedup", "{:.2f}x")]


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if "--layers" in argv:  # its own flags follow
        from tools import bench_layers  # imports this module: not at the top
        return bench_layers.main([a for a in argv if a != "--layers"])
    args = parse_args(argv)
    device = pick_device(args.device)
    archs, convs = _split(args.arch), _split(args.conv)
    check(bool(archs and convs and _split(args.amp)), "--arch, --amp and --conv need a value each")
    # The set-up of main.py for every setting asked for; the layout is a flag here.
    amps = list(dict.fromkeys(set_up(device, amp, conv, keep_freed=not args.default_malloc)[0]
                              for amp in _split(args.amp) for conv in convs))
    for arch in archs:
        try:
            get_preset(arch)
        except ValueError as err:
            raise UsageError(f"--arch: {err}") from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    malloc_tuned = device.type == "cpu" and not args.default_malloc
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, {args.frames_input}->{args.frames_output} frames, "
          f"compile {args.compile}, channels_last {args.channels_last}, "
          f"malloc {'keeps freed memory' if malloc_tuned else 'default'}, "
          f"median of {args.repeats} after {args.warmup} warm-up", flush=True)
    rows, textbook_cache = [], {}
    for arch in archs:
        for amp in amps:
            for conv in dict.fromkeys(convs):
                rows.append(run_row(args, arch, amp, conv, device, textbook_cache))
                rows[-1]["malloc_keeps_freed"] = malloc_tuned
    print(format_table(rows, COLUMNS))
    for row in rows:
        if "compile_s" in row:
            print(f"{row['arch']} {row['amp']} {row['conv']}: "
                  f"compiling took about {row['compile_s']:.0f} s")
    if args.json:
        write_rows(args.json, rows)
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
