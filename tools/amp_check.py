"""Does low precision train as well? Train fp32 and --amp from the same start on the same
Moving MNIST batches and compare the losses. Nothing is timed.

    python tools/amp_check.py --arch tiny --amp bf16 --steps 60 --data-root data/mnist

Without --data-root the sequences move random block shapes instead of digits.
docs/speed.md has the figures this printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, to run as a script

import numpy as np
import torch
import torch.nn.functional as F

from checkpoints import write_rows
from data import mm
from devices import autocast_context, pick_device, resolve_amp
from model import build_model
from net_params import get_preset
from tools.bench import add_shape_flags
from training import grad_scaler, train_step
from utils import ArgumentParser, UsageError, check, run_cli


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_flags(p, arch="tiny", batch_size=8)
    p.add_argument("--amp", default="bf16", metavar="bf16|fp16",
                   help="low precision(s) to compare with fp32, comma-separated; fp16 needs "
                        "CUDA (default: bf16)")
    p.add_argument("--steps", type=int, default=60, metavar="N",
                   help="training steps (default: 60)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder with the MNIST files; never downloads (default: block shapes)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results there (one run: an object; several: "
                        "{\"runs\": [...]})")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="(default: 0)")
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.frames_input, args.frames_output) < 1:
        p.error("--steps, --batch-size, --frames-input and --frames-output must be >= 1")
    return args


def block_shapes(n: int = 256, seed: int = 0) -> np.ndarray:
    """n blocky random 28x28 shapes, uint8 (n, 28, 28): digits for machines without MNIST."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(n, 7, 7, generator=g) > 0.6
    shapes = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)  # (n, 28, 28)
    return (shapes * 255).to(torch.uint8).numpy()


def amp_loss_check(arch: str, amp: str, steps: int, batch: int, frames_input: int,
                   frames_output: int, image_size: int | None, device, seed: int = 0,
                   data_root: str | None = None) -> dict:
    """Train `arch` `steps` steps in fp32 and under `amp` from the same start on the same
    Moving MNIST batches; return both runs' losses and fp32 MSE on held-out sequences."""
    preset = get_preset(arch)
    if data_root is None:
        digits, source = block_shapes(), "random block shapes"
    else:
        try:
            digits = mm.digit_pools(data_root, download=False)[0]
        except ValueError as err:  # a damaged file; a missing one is an OSError already
            raise UsageError(str(err)) from None
        source = f"MNIST digits from {data_root}"
    # The validation sequences are other sequences of the same digits (their own stream),
    # as when the figures in docs/speed.md were measured.
    common = dict(n_frames_input=frames_input, n_frames_output=frames_output, num_objects=[2],
                  seed=seed, image_size=image_size or preset.image_size, digits=digits)
    train = mm.MovingMNIST(None, True, length=steps * batch, **common)
    val = mm.MovingMNIST(None, False, length=2 * batch, **common)

    def batch_of(dataset, start):
        xs, ys = zip(*(dataset[i] for i in range(start, start + batch)))
        return torch.stack(xs).to(device), torch.stack(ys).to(device)  # (B, T, 1, H, W)

    result = {"arch": arch, "amp": amp, "steps": steps, "batch_size": batch, "data": source}
    for name, precision in (("fp32", "none"), (amp, amp)):
        torch.manual_seed(seed)
        model = build_model(preset).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=preset.lr)
        scaler = grad_scaler(device, precision)
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


def main(argv=None) -> list[dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = pick_device(args.device)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    amps = [a.strip() for a in args.amp.split(",") if a.strip()]
    check(bool(archs and amps), "--arch and --amp need a value each")
    for amp in amps:
        check(amp in ("bf16", "fp16"), f"--amp {amp!r}: compare fp32 with bf16 or fp16")
        resolve_amp(amp, device)  # fp16 needs CUDA
    for arch in archs:
        try:
            get_preset(arch)
        except ValueError as err:
            raise UsageError(f"--arch: {err}") from None
    results = []
    for arch in archs:
        for amp in amps:
            r = amp_loss_check(arch, amp, args.steps, args.batch_size, args.frames_input,
                               args.frames_output, args.image_size, device, args.seed,
                               args.data_root)
            results.append(r)
            print(f"{arch}, {r['steps']} steps of batch {r['batch_size']} on {r['data']}:")
            for key in ("last5_train_loss", "val_mse_fp32"):
                print(f"  {key:17s} fp32 {r['fp32'][key]:.5f}  {amp} {r[amp][key]:.5f}  "
                      f"ratio {r[key + '_ratio']:.3f}")
    if args.json:
        write_rows(args.json, results)
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
