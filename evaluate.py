"""Score a checkpoint with the field's metrics (and the nowcasting scores) against baselines, and draw its predictions.

    python evaluate.py --checkpoint runs/X/checkpoints/best.pt --test-set mnist_test_seq.npy
    python evaluate.py --checkpoint runs/X/checkpoints/best.pt --json scores.json   # made test set
    python evaluate.py --checkpoint runs/R/checkpoints/best.pt --test-set radar.h5:dbz \
        --thresholds 20 30 40 --baselines copy-last,optical-flow --json scores.json

Scores are in the data's units (a run's --value-range; [0, 1] without one). MSE and MAE
are per-frame sums over pixels on raw predictions; SSIM (scikit-image, 7x7 window) and
PSNR are on predictions mapped to [0, 1] and clipped there; all are averaged over frames
and sequences. `ssim` uses data_range 1 (PredRNN's convention), `ssim_openstl` data_range 2
(the convention of OpenSTL's published table): docs/metrics.md. --thresholds adds POD,
FAR, CSI, HSS and bias per threshold and lead time, from counts summed over the test set;
--balanced adds B-MSE and B-MAE. The baselines are scored on the same sequences.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from checkpoints import load_checkpoint, write_json
from data.arrays import SequenceArrayDataset, check_values, layout_type, open_sequences, split_spec
from data.mm import load_test_set, make_test_set
from devices import AMP_CHOICES, CONVS, autocast_context, pick_device, set_up, use_conv
from flow import MIN_SIZE, optical_flow_forecast, require_opencv
from metrics import (check_balance, check_thresholds, copy_last_frame, format_metrics_table,
                     format_thresholds_table, score)
from model import frame_size, load_model, total_stride
from net_params import Preset
from nowcast import BALANCE_THRESHOLDS, BALANCE_WEIGHTS
from pictures import picture_format, save_prediction_figure, save_prediction_gif
from utils import DEFAULT_DATA_ROOT, ArgumentParser, UsageError, check, check_memory, run_cli

# --baselines: name -> (JSON key, fn(inputs, frames_output) -> predictions, in the data's units)
BASELINES = {"copy-last": ("copy_last_baseline", copy_last_frame),
             "optical-flow": ("optical_flow_baseline", optical_flow_forecast)}


def parse_args(argv=None):
    p = ArgumentParser(description="Score a checkpoint on a fixed test set.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a .pt written by main.py")
    p.add_argument("--test-set", default=None, metavar="FILE",
                   help="FILE.npy, FILE.npz or FILE.h5:DATASET in --layout; values in the "
                        "data's units (default: Moving MNIST runs make a held-out set with "
                        "--seed; runs on your own data must name one)")
    p.add_argument("--layout", default=None, type=layout_type, metavar="AXES",
                   help="axis order of --test-set: N, T, H, W and optionally C, e.g. NTHW, "
                        "NTCHW or NHWT (default: the run's --layout for a run on your own "
                        "data, else TNHW, mnist_test_seq.npy's)")
    p.add_argument("--fill-nan", type=float, default=None, metavar="VALUE",
                   help="replace NaNs in --test-set by VALUE, in the data's units (default: "
                        "the run's --fill-nan; NaNs are refused without one)")
    p.add_argument("--any-size", action="store_true",
                   help="score --test-set frames of another size than the run trained on (the "
                        "model is convolutional; its strides must divide them) (default: refuse)")
    p.add_argument("--baselines", default="copy-last", metavar="NAMES",
                   help="comma-separated baselines scored beside the model: copy-last (repeat "
                        "the last input frame), optical-flow (extrapolate the last frame along "
                        "its motion; needs OpenCV), or none (default: copy-last)")
    p.add_argument("--thresholds", type=float, nargs="+", default=None, metavar="T",
                   help="add POD, FAR, CSI, HSS and bias at these event thresholds, in the "
                        "data's units (value >= T is an event) (default: none)")
    p.add_argument("--balanced", action="store_true",
                   help="add B-MSE and B-MAE (Shi et al. 2017) with --balance-thresholds and "
                        "--balance-weights (default: off)")
    p.add_argument("--balance-thresholds", type=float, nargs="+", default=None, metavar="T",
                   help="bin edges of B-MSE / B-MAE in the data's units (default: the run's, "
                        "else HKO-7's 2 5 10 30, mm/h)")
    p.add_argument("--balance-weights", type=float, nargs="+", default=None, metavar="W",
                   help="a weight per bin (default: the run's, else HKO-7's 1 2 5 10 30)")
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


def parse_baselines(text: str) -> dict:
    """--baselines -> {JSON key: fn}; OpenCV is checked here, before any work."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return {}
    for name in names:
        check(name in BASELINES, f"--baselines {text}: unknown baseline {name!r}; choose from "
                                 f"{', '.join(BASELINES)} (comma-separated), or none")
    check(len(set(names)) == len(names), f"--baselines {text} names a baseline twice")
    if "optical-flow" in names:
        require_opencv()
    return dict(BASELINES[name] for name in names)


def scoring_flags(args, config: dict) -> dict:
    """metrics.score's keywords: the run's units and the scores asked for, checked."""
    value_range = config.get("value_range")
    whose = "run's " if value_range is not None else ""
    if args.thresholds:
        check_thresholds("--thresholds", args.thresholds, value_range, whose)
    balance = None
    if args.balanced:
        thresholds = args.balance_thresholds or config.get("balance_thresholds") or list(BALANCE_THRESHOLDS)
        weights = args.balance_weights or config.get("balance_weights") or list(BALANCE_WEIGHTS)
        check_balance(thresholds, weights, value_range, whose)
        balance = (thresholds, weights)
    return dict(value_range=value_range, thresholds=args.thresholds, balance=balance)


def test_sequences(args, config: dict, num_digits: list[int]):
    """(N, T, C, H, W) test sequences in the file's dtype, their values checked."""
    own_data = bool(config.get("train_data"))
    if args.test_set:
        layout = args.layout or (config.get("layout") if own_data else None)
        if layout is None and split_spec(args.test_set)[0].suffix == ".npy":
            # a Moving MNIST run's test set: mnist_test_seq.npy's (T, N, H, W) uint8
            return open_sequences(np.asarray(load_test_set(args.test_set)), "TNHW").sequences, args.test_set
        opened = open_sequences(args.test_set, layout or "TNHW")
        fill = args.fill_nan if args.fill_nan is not None else config.get("fill_nan")
        check_values(opened.raw, opened.name, config.get("value_range"), fill)
        return opened.sequences, opened.name
    check(not own_data, f"{args.checkpoint} was trained on {config.get('train_data')}; name its "
                        f"test sequences with --test-set FILE (a made Moving MNIST set won't fit)")
    root = args.data_root or config.get("data_root", DEFAULT_DATA_ROOT)
    frames = config["frames_input"] + config["frames_output"]
    size = config["model"]["image_size"]
    check_memory(args.num * frames * size * size, f"--num {args.num} sequences of {frames} frames "
                 f"of {size}x{size} px", "lower --num")
    made = make_test_set(root, args.num, num_digits=num_digits, seed=args.seed, n_frames=frames,
                         image_size=config["model"]["image_size"],
                         download=not config.get("no_download", False))  # (T, N, H, W)
    return open_sequences(made, "TNHW").sequences, "the made test set"


def check_test_shape(args, config: dict, sequences, name: str, baselines: dict) -> None:
    """The test frames fit the model: its channels, its frame size (unless --any-size), its
    strides, and its input + output frames; and the optical-flow baseline's minimum size."""
    preset = Preset.from_dict(config["model"])
    _, T, C, H, W = sequences.shape
    fi, fo = config["frames_input"], config["frames_output"]
    where = f"--test-set {name}" if args.test_set else name
    check(C == preset.frame_channels,
          f"{where} has {C} channels but {args.checkpoint} takes {preset.frame_channels}")
    h, w = frame_size(preset)
    check((H, W) == (h, w) or args.any_size,
          f"{where} has frames of {H}x{W} but {args.checkpoint} was trained on {h}x{w}; crop "
          f"them, or add --any-size to score them as they are (the model is convolutional)")
    stride = total_stride(preset)
    check(H % stride == 0 and W % stride == 0,
          f"{where} has frames of {H}x{W}, but the model's stages downsample by {stride}; crop "
          f"them to a multiple of {stride}")
    check(min(H, W) >= 7, f"{where} has frames of {H}x{W}; SSIM needs at least 7x7")
    check(fi + fo <= T, f"{where}: {args.checkpoint} predicts {fo} from {fi} input frames, "
                        f"{fi + fo} in all, which don't fit in sequences of {T} frames; check --layout")
    if "optical_flow_baseline" in baselines:
        check(fi >= 2 and min(H, W) >= MIN_SIZE,
              f"--baselines optical-flow needs 2 input frames of at least {MIN_SIZE}x{MIN_SIZE} "
              f"pixels, got {fi} of {H}x{W}; leave it out of --baselines")


def main(argv=None) -> dict:
    args = parse_args(argv)
    check(args.num >= 1 and args.batch_size >= 1 and args.seed >= 0,
          f"--num, --batch-size must be >= 1 and --seed >= 0, got {args.num}, "
          f"{args.batch_size}, {args.seed}")
    check(args.num_digits is None or min(args.num_digits) >= 1,
          f"--num-digits must be >= 1, got {args.num_digits}")
    check(args.fill_nan is None or np.isfinite(args.fill_nan),
          f"--fill-nan must be a finite number, got {args.fill_nan}")
    baselines = parse_baselines(args.baselines)
    json_path, figure, gif = output_paths(args)
    checkpoint = load_checkpoint(args.checkpoint)
    config = checkpoint["config"]
    options = scoring_flags(args, config)
    device = pick_device(args.device)
    amp, memory_format = set_up(device, args.amp, args.conv)
    # The network itself: score() maps the data's units to its [0, 1] and back.
    model = load_model(args.checkpoint, device, data_units=False).to(memory_format=memory_format)
    use_conv(model, args.conv)

    fi, fo = config["frames_input"], config["frames_output"]
    num_digits = args.num_digits or config.get("num_digits", [2])
    sequences, name = test_sequences(args, config, num_digits)
    check_test_shape(args, config, sequences, name, baselines)
    fill = args.fill_nan if args.fill_nan is not None else config.get("fill_nan")
    dataset = SequenceArrayDataset(sequences, fi, fo, value_range=options["value_range"], fill_nan=fill)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    scores = score(model, loader, device, autocast_context(device, amp), fo, baselines=baselines,
                   **options)
    results = {key: acc.compute() for key, acc in scores.metrics.items()}
    own_data = bool(config.get("train_data"))
    report = {**results, "sequences": scores.sequences,
              "seq_per_s": scores.sequences / scores.model_seconds,
              "checkpoint": str(args.checkpoint), "epoch": checkpoint.get("epoch"),
              "test_set": args.test_set or f"made: {args.num} held-out sequences, seed {args.seed}",
              "num_digits": None if args.test_set or own_data else num_digits,
              "frames_input": fi, "frames_output": fo, "value_range": options["value_range"],
              "baselines": [k for k, (key, _) in BASELINES.items() if key in baselines],
              "amp": amp, "conv": args.conv}
    if options["balance"]:
        report["balance"] = {"thresholds": options["balance"][0], "weights": options["balance"][1]}

    if options["value_range"] is not None:
        lo, hi = options["value_range"]
        print(f"scores in the data's units (value range {lo:g} to {hi:g}); ssim and psnr on "
              f"frames mapped to [0, 1]")
    print(format_metrics_table(results))
    if args.thresholds:
        print("\n" + format_thresholds_table(results) + "\n(means over lead times; per lead time in --json)")
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
