"""Time the real training step and say how close it runs to the machine's convolution speed.

    python bench.py                                   # convlstm, batch 4, 10 -> 10, fp32
    python bench.py --amp none,bf16 --json bench.json # both precisions, one reference run
    python bench.py --arch convlstm,convgru --no-reference
    python bench.py --conv direct,auto --channels-last  # direct vs Winograd (fp32, CPU)

Per row (an --arch x --amp x --conv setting) it reports:
  * step time: median over --repeats of main.train_step (forward, loss, backward, gradient
    clipping, Adam step) after --warmup steps, with the device synchronised around each step;
  * GFLOP per step, counted by torch.utils.flop_counter.FlopCounterMode over the forward and
    backward of one step (on the meta device, so counting costs no compute; Adam adds no
    convolution or matmul FLOPs). This is the model's work done by direct convolutions,
    the same for every --conv algorithm; executed_gflop_per_step counts what the chosen
    algorithm runs (Winograd: about a quarter), so achieved GFLOP/s is an effective rate
    and Winograd's utilization can exceed 1;
  * roofline: GFLOP/s of one large dense convolution of the model's dominant shape (the
    bottom encoder cell's costliest state-side conv, e.g. ConvLSTM's 64 -> 256 5x5, run at
    batch*T_in frames of the bottom stage's size), forward AND backward, on the same device,
    dtype/autocast and memory format, measured in this run.
    Forward and backward because the step is one third forward and two thirds backward FLOPs,
    and the backward kernels (grad input, grad weight) run at their own speed. utilization =
    achieved / roofline;
  * the textbook baseline (reference.py: one conv over cat(x, h) per step, zeros convolved,
    fp32, no compile), timed the same way once per arch; speedup = seq/s / reference seq/s;
  * peak memory: CUDA max_memory_allocated over the timed steps. CPU: the growth of the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs before the timed
    steps) over its resident set before the model was built, so it counts weights,
    gradients, Adam state and activations (and what the allocator keeps), like CUDA's figure.
    Where /proc/self/clear_refs is missing it falls back to getrusage's lifetime peak.

On Linux CPU runs it first tells glibc to keep freed memory (keep_freed_memory), as
main.py should for training; --default-malloc measures without that.

    python bench.py --arch tiny --amp bf16 --loss-check 60 --batch-size 8 --data-root DIR

does not time anything: it trains fp32 and bf16 from the same start on the same Moving MNIST
batches and prints both losses, to check that low precision trains as well.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from data import mm
from main import autocast_context, train_step
from model import build_model
from net_params import get_preset
from reference import REFERENCE_CELLS, build_reference
from utils import keep_freed_memory, pick_device, synchronize
from winograd import resolve_conv_algorithm, set_conv_algorithm


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="convlstm", metavar="NAMES",
                   help="preset(s) of net_params.py, comma-separated for one row each "
                        "(default: convlstm)")
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="(default: 4)")
    p.add_argument("--frames-input", type=int, default=10, metavar="T", help="(default: 10)")
    p.add_argument("--frames-output", type=int, default=10, metavar="T", help="(default: 10)")
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="frame size (default: the preset's, 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--amp", default="none", metavar="none|bf16|fp16",
                   help="autocast precision, comma-separated for one row each; fp16 needs "
                        "CUDA (default: none)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    p.add_argument("--conv", default="auto", metavar="auto|direct|winograd",
                   help="cell convolution algorithm, comma-separated for one row each; auto = "
                        "winograd for fp32 on the CPU, else direct (default: auto)")
    p.add_argument("--channels-last", action="store_true",
                   help="model in channels_last memory format; the activations follow "
                        "(default: off)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch.set_num_threads for CPU runs (default: torch's choice)")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's default of unmapping freed tensors over 32 MB (default: "
                        "keep freed memory, as training should; see keep_freed_memory)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="untimed steps first (default: 1)")
    p.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="timed steps; the median is reported (default: 3)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip timing the slow textbook baseline (default: time it)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results there (one row: a flat object; several: "
                        "{\"runs\": [...]})")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="(default: 0)")
    p.add_argument("--loss-check", type=int, default=0, metavar="STEPS",
                   help="instead of timing, train STEPS steps in fp32 and in --amp from the "
                        "same start on Moving MNIST and compare the losses (default: off)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="MNIST files for --loss-check (default: none, random block shapes)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="compare DDP throughput of 1 and N processes on this machine "
                        "(torchrun, --batch-size per process; default: off)")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.frames_input < 1 or args.frames_output < 1:
        p.error("--batch-size, --frames-input and --frames-output must be >= 1")
    if args.warmup < 0 or args.repeats < 1:
        p.error("need --warmup >= 0 and --repeats >= 1")
    return args


# -----------------------------------------------------------------------------
# measuring

def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def release_memory() -> None:
    """Hand memory freed by earlier rows back to the OS, so RSS baselines start clean."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages otherwise
    except (OSError, AttributeError):
        pass


def reset_peak_memory(device: torch.device) -> bool:
    """Start a fresh peak. Returns False where only the process-lifetime peak is known."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM, the peak resident set, to the current one
        return _rss_kb("VmHWM") is not None
    except OSError:
        return False


def peak_memory_mb(device: torch.device, baseline_kb: int) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    peak_kb = _rss_kb("VmHWM")
    if peak_kb is None:  # ru_maxrss is KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_kb = peak // 1024 if sys.platform == "darwin" else peak
    return (peak_kb - baseline_kb) / 1024


def time_steps(step, device, warmup: int, repeats: int) -> tuple[list[float], float]:
    """Run `step` warmup + repeats times; returns (timed seconds, first warm-up seconds)."""
    first = None
    for _ in range(warmup):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        first = time.perf_counter() - t0 if first is None else first
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times, first


def with_conv(model, conv: str):
    set_conv_algorithm(model, conv)
    return model


def count_step_flops(make_model, batch: int, frames_input: int, frames_output: int,
                     channels: int, size: int) -> int:
    """FLOPs of the forward and backward of one training step, counted on the meta device."""
    with torch.device("meta"):
        model = make_model()
        inputs = torch.empty(batch, frames_input, channels, size, size)
        targets = torch.empty(batch, frames_output, channels, size, size)
    counter = FlopCounterMode(display=False)
    with counter:
        F.mse_loss(model(inputs, frames_output=frames_output), targets).backward()
    return counter.get_total_flops()


def roofline_gflops(device, amp: str, channels_last: bool, batch: int, in_channels: int,
                    out_channels: int, kernel: int, size: int, repeats: int) -> float:
    """GFLOP/s of one dense conv (batch, in, size, size) -> out, forward + backward."""
    g = torch.Generator(device="cpu").manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = torch.nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    conv = conv.to(device, memory_format=fmt)
    x = torch.randn(batch, in_channels, size, size, generator=g).to(device, memory_format=fmt)
    x.requires_grad_(True)  # the model needs grad input too: every state conv passes it back
    grad_out = None

    def step():
        nonlocal grad_out
        with autocast_context(device, amp):
            y = conv(x)
        if grad_out is None:
            grad_out = torch.randn(y.shape, generator=g).to(device, y.dtype, memory_format=fmt)
        y.backward(grad_out)

    times, _ = time_steps(step, device, warmup=1, repeats=repeats)
    flops = 3 * 2 * batch * size * size * out_channels * in_channels * kernel * kernel
    return flops / statistics.median(times) / 1e9


def bench_model(model, device, amp: str, inputs, targets, warmup: int, repeats: int,
                lr: float) -> dict:
    """Time main.train_step with Adam; the GradScaler is on only for fp16."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def step():
        train_step(model, optimizer, scaler, inputs, targets, autocast_context(device, amp))

    times, first = time_steps(step, device, warmup, 0)  # warm up (and compile) first
    exact_peak = reset_peak_memory(device)
    times, _ = time_steps(step, device, 0, repeats)
    median = statistics.median(times)
    return {"step_s": median, "all_step_s": times, "first_step_s": first,
            "exact_peak": exact_peak}


# -----------------------------------------------------------------------------
# several processes: DistributedDataParallel throughput

def ddp_worker(args) -> None:
    """One torchrun process: time DDP training steps; rank 0 writes the JSON row."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = pick_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    amp = args.amp.split(",")[0]
    torch.manual_seed(args.seed)
    model = build_model(args.arch.split(",")[0]).to(device)
    set_conv_algorithm(model, resolve_conv_algorithm(args.conv.split(",")[0], device, amp))
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None)
    size = args.image_size or model.preset.image_size
    g = torch.Generator().manual_seed(args.seed + rank)
    inputs = torch.rand(args.batch_size, args.frames_input, 1, size, size, generator=g).to(device)
    targets = torch.rand(args.batch_size, args.frames_output, 1, size, size, generator=g).to(device)
    result = bench_model(ddp, device, amp, inputs, targets, args.warmup, args.repeats, lr=1e-4)
    step_s = torch.tensor([result["step_s"]], dtype=torch.float64)
    dist.all_reduce(step_s, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"processes": world, "threads_per_process": torch.get_num_threads(),
                       "batch_per_process": args.batch_size,
                       "global_batch": args.batch_size * world,
                       "step_ms": 1000 * step_s.item(),
                       "seq_per_s": args.batch_size * world / step_s.item()}, f)
    del ddp, result
    gc.collect()  # free DDP (it sits in reference cycles) while its process group lives
    dist.barrier()
    dist.destroy_process_group()


def worker_flags(args) -> list[str]:
    """The settings a --ddp-worker process needs, as flags."""
    flags = ["--arch", args.arch, "--amp", args.amp, "--conv", args.conv, "--device", args.device,
             "--batch-size", str(args.batch_size), "--frames-input", str(args.frames_input),
             "--frames-output", str(args.frames_output), "--warmup", str(args.warmup),
             "--repeats", str(args.repeats), "--seed", str(args.seed)]
    if args.image_size:
        flags += ["--image-size", str(args.image_size)]
    if args.channels_last:
        flags.append("--channels-last")
    return flags


def ddp_scaling(args) -> list[dict]:
    """Throughput of 1 process versus args.nproc processes, each launched by torchrun."""
    import socket
    import subprocess
    import tempfile

    rows = []
    cores = os.cpu_count() or 1
    for n in sorted({1, args.nproc}):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ)
        if pick_device(args.device).type == "cpu":  # share the cores, don't oversubscribe
            env["OMP_NUM_THREADS"] = str(max(1, (args.threads or cores) // n))
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "row.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
                   "--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                   __file__, "--ddp-worker", "--json", out, *worker_flags(args)]
            subprocess.run(cmd, env=env, check=True)
            with open(out) as f:
                rows.append(json.load(f))
    base = rows[0]["seq_per_s"]
    print(f"{args.arch}, amp {args.amp}, batch {args.batch_size} per process, "
          f"{args.frames_input}->{args.frames_output} frames, DDP on {pick_device(args.device)}")
    print("processes  threads each  global batch  step ms   seq/s  vs 1 process")
    for r in rows:
        r["speedup_vs_1"] = r["seq_per_s"] / base
        print(f"{r['processes']:>9}  {r['threads_per_process']:>12}  {r['global_batch']:>12}  "
              f"{r['step_ms']:>7.0f}  {r['seq_per_s']:>6.2f}  {r['speedup_vs_1']:>11.2f}x")
    return rows


# -----------------------------------------------------------------------------
# does low precision train as well?

def check_digits(data_root: str | None) -> tuple[np.ndarray, str]:
    """MNIST training digits from data_root, else blocky random shapes (uint8 (N, 28, 28))."""
    if data_root is not None:
        try:
            return mm.digit_pools(data_root, download=False)[0], f"MNIST digits from {data_root}"
        except (FileNotFoundError, ValueError):
            pass
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(256, 7, 7, generator=g) > 0.6
    shapes = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)  # (256, 28, 28)
    return (shapes * 255).to(torch.uint8).numpy(), "random block shapes (no MNIST found)"


def amp_loss_check(arch: str, amp: str, steps: int, batch: int, frames_input: int,
                   frames_output: int, image_size: int | None, device, seed: int = 0,
                   data_root: str | None = None) -> dict:
    """Train `arch` `steps` steps in fp32 and under `amp` from the same start on the same
    Moving MNIST batches; return both runs' losses and fp32 MSE on held-out sequences."""
    preset = get_preset(arch)
    size = image_size or preset.image_size
    digits, source = check_digits(data_root)
    common = dict(n_frames_input=frames_input, n_frames_output=frames_output, num_objects=[2],
                  seed=seed, image_size=size, digits=digits)
    train = mm.MovingMNIST(None, True, length=steps * batch, **common)
    val = mm.MovingMNIST(None, False, length=2 * batch, **common)

    def batch_of(dataset, start):
        xs, ys = zip(*(dataset[i] for i in range(start, start + batch)))
        return torch.stack(xs).to(device), torch.stack(ys).to(device)

    result = {"arch": arch, "amp": amp, "steps": steps, "batch_size": batch, "data": source}
    for name, precision in (("fp32", "none"), (amp, amp)):
        torch.manual_seed(seed)
        model = build_model(preset).to(device)
        set_conv_algorithm(model, resolve_conv_algorithm("auto", device, precision))
        optimizer = torch.optim.Adam(model.parameters(), lr=preset.lr)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        losses = []
        for k in range(steps):
            inputs, targets = batch_of(train, k * batch)
            losses.append(train_step(model, optimizer, scaler, inputs, targets,
                                     autocast_context(device, precision)).item())
        with torch.no_grad():
            val_losses = [F.mse_loss(model(x, frames_output=frames_output), y).item()
                          for x, y in (batch_of(val, 0), batch_of(val, batch))]
        tail = losses[-min(5, steps):]
        result[name] = {"losses": losses, "last5_train_loss": sum(tail) / len(tail),
                        "val_mse_fp32": sum(val_losses) / len(val_losses)}
    for key in ("last5_train_loss", "val_mse_fp32"):
        result[f"{key}_ratio"] = result[amp][key] / result["fp32"][key]
    return result


# -----------------------------------------------------------------------------
# one row

def dominant_conv(model) -> tuple[int, int, int]:
    """(in, out, kernel) of the bottom encoder cell's costliest state-side convolution.

    ConvLSTM: the state conv, hidden -> 4 * hidden; ConvGRU: the gate conv, hidden ->
    2 * hidden; the input convolutions are left out (they run time-batched).
    """
    cell = model.encoder.stages[0].cell
    convs = [m for name, m in cell.named_modules()
             if isinstance(m, torch.nn.Conv2d) and "input" not in name]
    conv = max(convs, key=lambda c: c.in_channels * c.out_channels * c.kernel_size[0] ** 2)
    return conv.in_channels, conv.out_channels, conv.kernel_size[0]


def processor_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_row(args, arch: str, amp: str, conv: str, device, reference_cache: dict) -> dict:
    preset = get_preset(arch)
    size = args.image_size or preset.image_size
    B, T_in, T_out = args.batch_size, args.frames_input, args.frames_output
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(args.seed)
    inputs = torch.rand(B, T_in, preset.frame_channels, size, size, generator=g).to(device)
    targets = torch.rand(B, T_out, preset.frame_channels, size, size, generator=g).to(device)

    release_memory()
    baseline_kb = _rss_kb("VmRSS") or 0
    torch.manual_seed(args.seed)
    model = build_model(preset).to(device, memory_format=fmt)
    set_conv_algorithm(model, conv)
    in_ch, out_ch, kernel = dominant_conv(model)
    bottom_size = size // preset.stages[0].down.stride
    runnable = torch.compile(model) if args.compile else model
    fast = bench_model(runnable, device, amp, inputs, targets, args.warmup, args.repeats,
                       preset.lr)
    peak_mb = peak_memory_mb(device, baseline_kb)
    del runnable, model

    # The model's convolution work as a direct convolution computes it: the same for every
    # algorithm, so GFLOP/s compare like seq/s do. What Winograd executes is reported apart.
    flops = count_step_flops(lambda: build_model(preset), B, T_in, T_out,
                             preset.frame_channels, size)
    executed = count_step_flops(lambda: with_conv(build_model(preset), conv), B, T_in, T_out,
                                preset.frame_channels, size)
    roofline = roofline_gflops(device, amp, args.channels_last, B * T_in, in_ch, out_ch, kernel,
                               bottom_size, repeats=max(2, min(args.repeats, 5)))

    ref = None
    if not args.no_reference and preset.cell in REFERENCE_CELLS:
        if arch not in reference_cache:
            torch.manual_seed(args.seed)
            release_memory()
            baseline_kb = _rss_kb("VmRSS") or 0
            ref_model = build_reference(preset).to(device)
            timing = bench_model(ref_model, device, "none", inputs, targets, args.warmup,
                                 args.repeats, preset.lr)
            timing["peak_mem_mb"] = peak_memory_mb(device, baseline_kb)
            timing["flops"] = count_step_flops(lambda: build_reference(preset), B, T_in, T_out,
                                               preset.frame_channels, size)
            reference_cache[arch] = timing
            del ref_model
        ref = reference_cache[arch]

    step_s = fast["step_s"]
    achieved = flops / step_s / 1e9
    row = {
        "arch": arch, "batch_size": B, "frames_input": T_in, "frames_output": T_out,
        "image_size": size, "amp": amp, "conv": conv, "compile": args.compile,
        "channels_last": args.channels_last, "device": str(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "processor": processor_name(device),
        "seq_per_s": B / step_s,
        "step_ms": 1e3 * step_s,
        "step_ms_all": [1e3 * t for t in fast["all_step_s"]],
        "first_step_ms": None if fast["first_step_s"] is None else 1e3 * fast["first_step_s"],
        "peak_mem_mb": peak_mb,
        "peak_mem_exact": fast["exact_peak"],
        "gflop_per_step": flops / 1e9,
        "executed_gflop_per_step": executed / 1e9,
        "achieved_gflops": achieved,
        "roofline_gflops": roofline,
        "roofline_conv": f"conv{kernel}x{kernel} {in_ch}->{out_ch} at "
                         f"{B * T_in}x{bottom_size}x{bottom_size}, fwd+bwd",
        "utilization": achieved / roofline,
        "reference_seq_per_s": None if ref is None else B / ref["step_s"],
        "reference_step_ms": None if ref is None else 1e3 * ref["step_s"],
        "reference_gflop_per_step": None if ref is None else ref["flops"] / 1e9,
        "reference_peak_mem_mb": None if ref is None else ref["peak_mem_mb"],
        "speedup": None if ref is None else ref["step_s"] / step_s,
    }
    if args.compile and fast["first_step_s"] is not None:
        row["compile_s"] = fast["first_step_s"] - step_s  # the first step's extra time
    return row


# -----------------------------------------------------------------------------
# report

COLUMNS = [  # (header, key, format)
    ("arch", "arch", "{}"), ("amp", "amp", "{}"), ("conv", "conv", "{}"),
    ("seq/s", "seq_per_s", "{:.3f}"),
    ("step ms", "step_ms", "{:.0f}"), ("GFLOP/step", "gflop_per_step", "{:.4g}"),
    ("GFLOP/s", "achieved_gflops", "{:.1f}"), ("roofline", "roofline_gflops", "{:.1f}"),
    ("util", "utilization", "{:.2f}"), ("peak MB", "peak_mem_mb", "{:.0f}"),
    ("ref seq/s", "reference_seq_per_s", "{:.3f}"), ("speedup", "speedup", "{:.2f}x"),
]


def format_table(rows: list[dict]) -> str:
    cells = [[h for h, _, _ in COLUMNS]]
    for row in rows:
        cells.append(["-" if row.get(k) is None else fmt.format(row[k]) for _, k, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_loss_checks(args, archs: list[str], amps: list[str], device) -> list[dict]:
    if all(a == "none" for a in amps):
        raise SystemExit("bench.py: --loss-check compares fp32 with a low precision; "
                         "add --amp bf16")
    results = []
    for arch in archs:
        for amp in (a for a in amps if a != "none"):
            r = amp_loss_check(arch, amp, args.loss_check, args.batch_size, args.frames_input,
                               args.frames_output, args.image_size, device, args.seed,
                               args.data_root)
            results.append(r)
            print(f"{arch}, {r['steps']} steps of batch {r['batch_size']} on {r['data']}:")
            for key in ("last5_train_loss", "val_mse_fp32"):
                print(f"  {key:17s} fp32 {r['fp32'][key]:.5f}  {amp} {r[amp][key]:.5f}  "
                      f"ratio {r[key + '_ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else {"runs": results}, f, indent=2)
    return results


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.ddp_worker:
        return ddp_worker(args)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    amps = [a.strip() for a in args.amp.split(",") if a.strip()]
    convs = [c.strip() for c in args.conv.split(",") if c.strip()]
    try:  # a bad --device, --amp, --conv or --arch stops here with its one-line reason
        device = pick_device(args.device)
        for amp in amps:
            autocast_context(device, amp)
        settings = [(amp, resolve_conv_algorithm(conv, device, amp))
                    for amp in amps for conv in convs]
        for arch in archs:
            get_preset(arch)
    except ValueError as err:
        raise SystemExit(f"bench.py: {err}") from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    malloc_tuned = device.type == "cpu" and not args.default_malloc and keep_freed_memory()
    if args.loss_check:
        return run_loss_checks(args, archs, amps, device)
    if args.nproc:
        rows = ddp_scaling(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ddp": rows}, f, indent=2)
                f.write("\n")
        return rows
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, {args.frames_input}->{args.frames_output} frames, "
          f"compile {args.compile}, channels_last {args.channels_last}, "
          f"malloc {'keeps freed memory' if malloc_tuned else 'default'}, "
          f"median of {args.repeats} after {args.warmup} warm-up", flush=True)
    rows, reference_cache = [], {}
    for arch in archs:
        for amp, conv in dict.fromkeys(settings):  # each resolved pair once, in order
            rows.append(run_row(args, arch, amp, conv, device, reference_cache))
            rows[-1]["malloc_keeps_freed"] = malloc_tuned
            print(f"  {arch} {amp} {conv}: {rows[-1]['step_ms']:.0f} ms/step", flush=True)
    print(format_table(rows))
    for row in rows:
        if "compile_s" in row:
            print(f"{row['arch']} {row['amp']}: compiling took about {row['compile_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows[0] if len(rows) == 1 else {"runs": rows}, f, indent=2)
            f.write("\n")
    return rows


if __name__ == "__main__":
    main()
