"""Score a checkpoint with the field's standard metrics and draw its predictions.

    python evaluate.py --checkpoint runs/X/checkpoints/best.pt --test-set mnist_test_seq.npy
    python evaluate.py --checkpoint runs/X/checkpoints/best.pt   # a seeded held-out set

MSE and MAE are per-frame sums over pixels on raw predictions; SSIM (scikit-image, 7x7
window, data_range 1) and PSNR are on predictions clipped to [0, 1]; all are averaged over
frames and sequences, as OpenSTL and PredRNN report them. The copy-last-frame baseline is
scored on the same sequences.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.mm import SequenceArrayDataset, load_sequences, load_test_set, make_test_set
from main import autocast_context
from model import build_model
from utils import (MetricAccumulator, copy_last_frame, format_metrics_table, load_checkpoint,
                   pick_device, save_prediction_figure, save_prediction_gif, synchronize)
from winograd import ALGORITHMS, resolve_conv_algorithm, set_conv_algorithm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Score a checkpoint on a fixed test set.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a .pt written by main.py")
    p.add_argument("--test-set", default=None, metavar="FILE",
                   help="mnist_test_seq.npy-style (T, N, H, W) uint8, or --layout NTHW/NTCHW "
                        "(default: a held-out set made with --seed)")
    p.add_argument("--layout", default="TNHW", choices=["TNHW", "NTHW", "NTCHW"],
                   help="axis order of --test-set (default: TNHW, mnist_test_seq's)")
    p.add_argument("--num", type=int, default=2000, metavar="N",
                   help="sequences to make without --test-set (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the made test set (default: 0)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="MNIST files for the made test set (default: the run's)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the scores here (default: off)")
    p.add_argument("--figure", default=None, metavar="PNG",
                   help="prediction figure (default: predictions.png in the run folder)")
    p.add_argument("--gif", default=None, metavar="GIF",
                   help="animated predictions (default: predictions.gif in the run folder)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (default: auto)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="(default: 32)")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="autocast precision (default: none)")
    p.add_argument("--conv", default="auto", choices=ALGORITHMS,
                   help="cell convolution algorithm, as main.py's (default: auto: winograd "
                        "for fp32 on the CPU, else direct)")
    return p.parse_args(argv)


def test_sequences(args, config: dict) -> np.ndarray:
    """(N, T, C, H, W) uint8 or float test sequences."""
    if args.test_set:
        if args.layout == "TNHW":
            return load_sequences(np.asarray(load_test_set(args.test_set)), layout="TNHW")
        return load_sequences(args.test_set, layout=args.layout)
    root = args.data_root or config["data_root"]
    frames = config["frames_input"] + config["frames_output"]
    made = make_test_set(root, args.num, num_digits=config["num_digits"][0], seed=args.seed,
                         n_frames=frames, image_size=config["model"]["image_size"],
                         download=not config.get("no_download", False))  # (T, N, H, W)
    return load_sequences(made, layout="TNHW")


@torch.no_grad()
def evaluate(model, loader, device, amp_ctx, frames_output: int):
    """Scores of the model and of the copy-last-frame baseline, and the first batch."""
    scores = {"model": MetricAccumulator(frames_output),
              "copy_last_baseline": MetricAccumulator(frames_output)}
    first, model_seconds, n = None, 0.0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        t0 = time.perf_counter()
        with amp_ctx:
            pred = model(inputs, frames_output=frames_output).float()
        synchronize(device)
        model_seconds += time.perf_counter() - t0
        n += len(inputs)
        scores["model"].update(pred, targets)
        scores["copy_last_baseline"].update(copy_last_frame(inputs, frames_output), targets)
        if first is None:
            first = (inputs.cpu(), targets.cpu(), pred.cpu())
    return {k: acc.compute() for k, acc in scores.items()}, n / model_seconds, first


def main(argv=None) -> dict:
    args = parse_args(argv)
    checkpoint = load_checkpoint(args.checkpoint)
    config = checkpoint["config"]
    device = pick_device(args.device)
    model = build_model(config["model"]).to(device)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    conv = resolve_conv_algorithm(args.conv, device, args.amp)
    set_conv_algorithm(model, conv)

    fi, fo = config["frames_input"], config["frames_output"]
    sequences = test_sequences(args, config)
    dataset = SequenceArrayDataset(sequences, fi, fo)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    results, seq_per_s, (inputs, targets, preds) = evaluate(
        model, loader, device, autocast_context(device, args.amp), fo)
    report = {**results, "sequences": len(dataset), "seq_per_s": seq_per_s,
              "checkpoint": str(args.checkpoint), "epoch": checkpoint.get("epoch"),
              "test_set": args.test_set or f"made: {args.num} held-out sequences, seed {args.seed}",
              "frames_input": fi, "frames_output": fo, "conv": conv}

    print(format_metrics_table(results))
    print(f"{len(dataset)} sequences, {seq_per_s:.1f} seq/s on {device}")
    run_dir = Path(args.checkpoint).resolve().parent.parent
    figure = Path(args.figure or run_dir / "predictions.png")
    gif = Path(args.gif or run_dir / "predictions.gif")
    save_prediction_figure(figure, inputs, targets, preds)
    save_prediction_gif(gif, inputs, targets, preds)
    print(f"wrote {figure} and {gif}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:  # not a checkpoint, a test set of the wrong shape: say so in one line
        sys.exit(f"error: {e}")
