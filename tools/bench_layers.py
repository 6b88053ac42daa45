"""Time the ConvLSTM/ConvGRU layer against its cells run by hand and the textbook layer, per shape.

    python tools/bench_layers.py                     # the issue's grid: a few minutes on 2 cores
    python tools/bench_layers.py --in-channels 1,64 --kernels 5 --layout channels_last
    python tools/bench.py --layers --cell convgru    # the same, from bench.py

One row per shape (input channels, layers, kernel, precision, layout). Each row times the
forward and backward pass of the same math five ways, interleaved (every repeat runs each
once, so a competing process slows all alike), and reports the median milliseconds:

    auto      the layer as built: input_conv="auto" (ConvRNN.FUSE_MAX_INPUT_CHANNELS decides)
    batched   the layer with input_conv="batched" (input convolution once over all T frames)
    fused     the layer with input_conv="fused" (one convolution over cat(x, h) per step)
    run_cell  the batched layer's cells run by hand with ConvRNN.run_cell, layer after layer
    textbook  tools/textbook.py's cells stacked: one convolution over cat(x, h) per step and
              the zero initial states materialised, as ndrplz/ConvLSTM_pytorch computes

and the ratios run_cell/batched (1.00: the layer costs nothing over its cells),
textbook/auto (above 1: the layer beats the textbook) and batched/fused (above 1: fused wins
on that shape; what FUSE_MAX_INPUT_CHANNELS should follow). bf16 runs under autocast, as
main.py trains; "auto" precision adds bf16 only where the processor supports it natively.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, to run as a script

import torch

import utils
from ConvRNN import FUSE_MAX_INPUT_CHANNELS, ConvGRU, ConvLSTM, run_cell
from tools.bench import processor_name, time_steps
from tools.textbook import TEXTBOOK_CELLS, run_textbook_cell
from checkpoints import atomic_write_text
from devices import autocast_context, configure_process, pick_device
from utils import UsageError

LAYERS = {"convlstm": ConvLSTM, "convgru": ConvGRU}
LAYOUTS = ("nchw", "channels_last")
VARIANTS = ("auto", "batched", "fused", "run_cell", "textbook")


def parse_args(argv):
    p = utils.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cell", default="convlstm", choices=sorted(LAYERS),
                   help="layer kind (default: convlstm)")
    p.add_argument("--in-channels", default="1,8,64", metavar="LIST",
                   help="input channel counts, comma-separated (default: 1,8,64)")
    p.add_argument("--num-layers", default="1,2", metavar="LIST",
                   help="layer counts, comma-separated (default: 1,2)")
    p.add_argument("--kernels", default="3,5", metavar="LIST",
                   help="odd square kernel sizes, comma-separated (default: 3,5)")
    p.add_argument("--amp", default="auto", metavar="auto|none|bf16",
                   help="precisions, comma-separated; auto = none, plus bf16 where the "
                        "processor has native bf16 (default: auto)")
    p.add_argument("--layout", default=",".join(LAYOUTS), metavar="LIST",
                   help=f"memory layouts of weights and frames (default: {','.join(LAYOUTS)})")
    p.add_argument("--hidden", type=int, default=32, metavar="C",
                   help="hidden channels of every layer (default: 32)")
    p.add_argument("--batch-size", type=int, default=2, metavar="N", help="(default: 2)")
    p.add_argument("--frames", type=int, default=8, metavar="T", help="(default: 8)")
    p.add_argument("--size", type=int, default=32, metavar="PX",
                   help="frame height and width (default: 32)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="untimed passes of each variant (default: 1)")
    p.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="timed passes of each variant; the median is reported (default: 3)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the rows there as {\"runs\": [...]}")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="(default: 0)")
    args = p.parse_args(argv)
    try:
        args.in_channels = _ints(args.in_channels)
        args.num_layers = _ints(args.num_layers)
        args.kernels = _ints(args.kernels)
    except ValueError:
        raise UsageError("--in-channels, --num-layers and --kernels take comma-separated "
                         "integers, e.g. --kernels 3,5") from None
    utils.check(bool(args.in_channels and args.num_layers and args.kernels)
                and min(args.in_channels + args.num_layers) >= 1,
                "--in-channels and --num-layers need values >= 1")
    utils.check(all(k >= 1 and k % 2 for k in args.kernels),
                f"--kernels {','.join(map(str, args.kernels))}: cell kernels must be odd, e.g. 3,5")
    args.layout = [s.strip() for s in args.layout.split(",") if s.strip()]
    utils.check(bool(args.layout) and set(args.layout) <= set(LAYOUTS),
                f"--layout {','.join(args.layout)}: use {' and/or '.join(LAYOUTS)}")
    utils.check(min(args.hidden, args.batch_size, args.frames, args.size, args.repeats) >= 1
                and args.warmup >= 0,
                "need --hidden, --batch-size, --frames, --size, --repeats >= 1 and --warmup >= 0")
    return args


def _ints(flag: str) -> list[int]:
    return [int(item) for item in flag.split(",") if item.strip()]


def native_bf16(device) -> bool:
    """Does the device run bf16 natively (oneDNN's bf16 path on the CPU, bf16 CUDA GPUs)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_amps(flag: str, device) -> list[str]:
    amps = []
    for amp in (a.strip() for a in flag.split(",") if a.strip()):
        if amp == "auto":
            amps += ["none"] + (["bf16"] if native_bf16(device) else [])
        else:
            utils.check(amp in ("none", "bf16"), f"--amp {amp!r}: use auto, none or bf16")
            amps.append(amp)
    utils.check(bool(amps), "--amp needs a value")
    return list(dict.fromkeys(amps))


def capability(device) -> str:
    """The processor, and what its convolutions can use, for the header line."""
    if device.type != "cpu":
        return processor_name(device)
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f
                          if line.startswith("flags")), set())
    except OSError:
        pass
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return (f"{processor_name(device)}, torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 "
            f"{'yes' if native_bf16(device) else 'no'}, native bf16 instructions "
            f"{'+'.join(native) if native else 'none'}")


# -----------------------------------------------------------------------------
# the five variants

def channels_last_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) with every frame laid out channels_last, as run_cell keeps them."""
    return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


class TextbookLayer(torch.nn.Module):
    """tools/textbook.py's cells stacked: (B, T, C_in, H, W) -> (B, T, C_hid, H, W)."""

    def __init__(self, cell: str, in_channels: int, hidden: int, kernel: int, num_layers: int):
        super().__init__()
        cls = TEXTBOOK_CELLS[cell]
        self.cells = torch.nn.ModuleList(
            cls(in_channels if k == 0 else hidden, hidden, kernel) for k in range(num_layers))

    def forward(self, x):
        for cell in self.cells:
            x, _ = run_textbook_cell(cell, x, cell.zero_state(x[:, 0]))
        return x


def variants(args, cell: str, in_channels: int, num_layers: int, kernel: int, fmt, device):
    """{name: (module, forward function)} with the same shapes and math."""
    def build(module):
        return module.to(device, memory_format=fmt)

    layers = {}
    for mode in ("auto", "batched", "fused"):
        torch.manual_seed(args.seed)
        layers[mode] = build(LAYERS[cell](in_channels, args.hidden, kernel, num_layers,
                                          input_conv=mode))
    batched = layers["batched"]

    def by_hand(x):
        for c in batched.cells:
            x, _ = run_cell(c, x)
        return x

    torch.manual_seed(args.seed)
    textbook = build(TextbookLayer(cell, in_channels, args.hidden, kernel, num_layers))
    out = {mode: (layer, lambda x, layer=layer: layer(x)[0]) for mode, layer in layers.items()}
    out["run_cell"] = (batched, by_hand)
    out["textbook"] = (textbook, textbook)
    return out


def time_row(args, cell, in_channels, num_layers, kernel, amp, layout, device) -> dict:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, args.frames, in_channels, args.size, args.size, generator=g)
    x = x.to(device)
    if layout == "channels_last":
        x = channels_last_frames(x)
    x.requires_grad_(True)  # the layer sits inside a model: its input's gradient is needed
    steps = {}
    for name, (module, forward) in variants(args, cell, in_channels, num_layers, kernel,
                                            fmt, device).items():
        grads = {}

        def step(module=module, forward=forward, grads=grads):
            for p in (x, *module.parameters()):
                p.grad = None
            with autocast_context(device, amp):
                out = forward(x)
            if "out" not in grads:  # in out's own layout, made once
                grads["out"] = torch.randn_like(out)
            out.backward(grads["out"])
        steps[name] = step
    for step in steps.values():
        time_steps(step, device, args.warmup)
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name] += time_steps(step, device, 1)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    probe = LAYERS[cell](in_channels, args.hidden, kernel, num_layers)
    choice = ",".join("fused" if probe.fused(k) else "batched" for k in range(num_layers))
    row = {"cell": cell, "in_channels": in_channels, "num_layers": num_layers,
           "kernel": kernel, "amp": amp, "layout": layout, "auto_choice": choice,
           "hidden": args.hidden, "batch_size": args.batch_size, "frames": args.frames,
           "size": args.size, "device": str(device), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "processor": processor_name(device),
           "fuse_max_input_channels": FUSE_MAX_INPUT_CHANNELS,
           **{f"{name}_ms": ms[name] for name in VARIANTS},
           **{f"{name}_ms_all": [1e3 * t for t in times[name]] for name in VARIANTS},
           "run_cell_over_batched": ms["run_cell"] / ms["batched"],
           "textbook_over_auto": ms["textbook"] / ms["auto"],
           "batched_over_fused": ms["batched"] / ms["fused"]}
    print(f"  {cell} C_in={in_channels} layers={num_layers} {kernel}x{kernel} {amp} {layout}: "
          + ", ".join(f"{name} {ms[name]:.1f}" for name in VARIANTS) + " ms", flush=True)
    return row


COLUMNS = [("cell", "cell", "{}"), ("C_in", "in_channels", "{}"), ("layers", "num_layers", "{}"),
           ("kernel", "kernel", "{}"), ("amp", "amp", "{}"), ("layout", "layout", "{}"),
           ("auto is", "auto_choice", "{}"), ("auto ms", "auto_ms", "{:.1f}"),
           ("batched ms", "batched_ms", "{:.1f}"), ("fused ms", "fused_ms", "{:.1f}"),
           ("run_cell ms", "run_cell_ms", "{:.1f}"), ("textbook ms", "textbook_ms", "{:.1f}"),
           ("run_cell/batched", "run_cell_over_batched", "{:.2f}"),
           ("textbook/auto", "textbook_over_auto", "{:.2f}"),
           ("batched/fused", "batched_over_fused", "{:.2f}")]


def main(argv=None) -> list[dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = pick_device(args.device)
    amps = resolve_amps(args.amp, device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    configure_process(device)  # as main.py and bench.py; the layout is a flag here
    print(f"device {device}: {capability(device)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.cell}, hidden {args.hidden}, batch "
          f"{args.batch_size}, {args.frames} frames of {args.size}x{args.size}; forward+backward, "
          f"median of {args.repeats} after {args.warmup} warm-up; FUSE_MAX_INPUT_CHANNELS "
          f"{FUSE_MAX_INPUT_CHANNELS}", flush=True)
    rows = []
    for amp in amps:
        for in_channels in args.in_channels:
            for num_layers in args.num_layers:
                for kernel in args.kernels:
                    for layout in args.layout:
                        rows.append(time_row(args, args.cell, in_channels, num_layers, kernel,
                                             amp, layout, device))
    print(utils.format_table(rows, COLUMNS))
    if args.json:
        atomic_write_text(args.json, json.dumps({"runs": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
