"""Score a checkpoint with the field's metrics and draw its predictions.

    python evaluate.py --checkpoint runs/X/checkpoints/best.pt --test-set mnist_test_seq.npy
    python evaluate.py --checkpoint runs/X/checkpoints/best.pt --json scores.json   # made test set

MSE and MAE are per-frame sums over pixels on raw predictions; SSIM (scikit-image, 7x7
window) and PSNR are on predictions clipped to [0, 1]; all are averaged over frames and
sequences. `ssim` uses data_range 1 (PredRNN's convention), `ssim_openstl` data_range 2
(the convention of OpenSTL's published table): docs/metrics.md. The copy-last-frame
baseline is scored on the same sequences.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from checkpoints import load_checkpoint, write_json
from data.arrays import LAYOUTS, SequenceArrayDataset, load_sequences
from data.mm import load_test_set, make_test_set
from devices import AMP_CHOICES, CONVS, autocast_context, pick_device, set_up, use_conv
from metrics import copy_last_frame, format_metrics_table, score
from model import load_model
from pictures import picture_format, save_prediction_figure, save_prediction_gif
from utils import DEFAULT_DATA_ROOT, ArgumentParser, UsageError, check, check_memory, run_cli


def parse_args(argv=None):
    p = ArgumentParser(description="Score a checkpoint on a fixed test set.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a .pt written by main.py")
    p.add_argument("--test-set", default=None, metavar="FILE",
                   help="mnist_test_seq.npy-style (T, N, H, W) uint8, or --layout NTHW/NTCHW "
                        "(default: a held-out set made with --seed)")
    p.add_argument("--layout", default="TNHW", choices=LAYOUTS,
                   help="axis order of --test-set (default: TNHW, mnist_test_seq's)")
    p.add_argument("--num", type=int, default=2000, metavar="N",
                   help="sequences to make without --test-set (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the made test set (default: 0)")
    p.add_argument("--num-digits", type=int, nargs="+", default=None, metavar="K",
                   help="digits per made sequence, drawn from this list (default: the run's)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="MNIST files for the made test set (default: the run's)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the scores here (default: off)")
    p.add_argument("--figure", default=None, metavar="PNG",
                   help="prediction figure, .png, .jpg, .gif, .webp, ... as its name ends "
                        "(default: predictions.png beside --json, or here)")
    p.add_argument("--gif", default=None, metavar="GIF",
                   help="animated predictions, .gif, .webp or .png (APNG) as its name ends "
                        "(default: predictions.gif beside --json, or here)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (default: auto)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="(default: 32)")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="autocast precision, as main.py's (default: auto)")
    p.add_argument("--conv", default="direct", choices=CONVS,
                   help="the cells' 5x5 convolutions, as main.py's (default: direct)")
    return p.parse_args(argv)


def check_writable(flag: str, path: Path) -> None:
    """Fail now, not after scoring, if `path` can't be written."""
    check(not path.is_dir(), f"{flag} {path} is a directory; name a file")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    check(folder.is_dir() and os.access(folder, os.W_OK),
          f"{flag} {path}: can't write in {folder}")


def output_paths(args) -> tuple[Path | None, Path, Path]:
    """(json, figure, gif): the pictures go beside the JSON, or in the current folder."""
    out = Path(args.json) if args.json else None
    folder = out.parent if out else Path(".")
    figure = Path(args.figure) if args.figure else folder / "predictions.png"
    gif = Path(args.gif) if args.gif else folder / "predictions.gif"
    for flag, path in (("--json", out), ("--figure", figure), ("--gif", gif)):
        if path is not None:
            check_writable(flag, path)
    for flag, path in (("--figure", figure), ("--gif", gif)):
        try:
            picture_format(path, animated=flag == "--gif")
        except ValueError as err:
            raise UsageError(f"{flag} {path}: {err}") from None
    return out, figure, gif


def test_sequences(args, config: dict, num_digits: list[int]) -> np.ndarray:
    """(N, T, C, H, W) uint8 or float test sequences."""
    if args.test_set:
        if args.layout == "TNHW":
            return load_sequences(np.asarray(load_test_set(args.test_set)), layout="TNHW")
        return load_sequences(args.test_set, layout=args.layout)
    root = args.data_root or config.get("data_root", DEFAULT_DATA_ROOT)
    frames = config["frames_input"] + config["frames_output"]
    size = config["model"]["image_size"]
    check_memory(args.num * frames * size * size, f"--num {args.num} sequences of {frames} frames "
                 f"of {size}x{size} px", "lower --num")
    made = make_test_set(root, args.num, num_digits=num_digits, seed=args.seed, n_frames=frames,
                         image_size=config["model"]["image_size"],
                         download=not config.get("no_download", False))  # (T, N, H, W)
    return load_sequences(made, layout="TNHW")


def main(argv=None) -> dict:
    args = parse_args(argv)
    check(args.num >= 1 and args.batch_size >= 1 and args.seed >= 0,
          f"--num, --batch-size must be >= 1 and --seed >= 0, got {args.num}, "
          f"{args.batch_size}, {args.seed}")
    check(args.num_digits is None or min(args.num_digits) >= 1,
          f"--num-digits must be >= 1, got {args.num_digits}")
    json_path, figure, gif = output_paths(args)
    checkpoint = load_checkpoint(args.checkpoint)
    config = checkpoint["config"]
    device = pick_device(args.device)
    amp, memory_format = set_up(device, args.amp, args.conv)
    model = load_model(args.checkpoint, device).to(memory_format=memory_format)
    use_conv(model, args.conv)

    fi, fo = config["frames_input"], config["frames_output"]
    num_digits = args.num_digits or config.get("num_digits", [2])
    dataset = SequenceArrayDataset(test_sequences(args, config, num_digits), fi, fo)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    scores = score(model, loader, device, autocast_context(device, amp), fo,
                   baselines={"copy_last_baseline": copy_last_frame})
    results = {name: acc.compute() for name, acc in scores.metrics.items()}
    report = {**results, "sequences": scores.sequences,
              "seq_per_s": scores.sequences / scores.model_seconds,
              "checkpoint": str(args.checkpoint), "epoch": checkpoint.get("epoch"),
              "test_set": args.test_set or f"made: {args.num} held-out sequences, seed {args.seed}",
              "num_digits": None if args.test_set else num_digits,
              "frames_input": fi, "frames_output": fo, "amp": amp, "conv": args.conv}

    print(format_metrics_table(results))
    print(f"{scores.sequences} sequences, {report['seq_per_s']:.1f} seq/s on {device}")
    save_prediction_figure(figure, *scores.first_batch)
    save_prediction_gif(gif, *scores.first_batch)
    print(f"wrote {figure} and {gif}")
    if json_path:
        write_json(json_path, report)
        print(f"wrote {json_path}")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
