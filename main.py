"""Train an encoder-forecaster on Moving MNIST (or your own sequences).

    python main.py                                     # convlstm, the original's setting
    python main.py --arch tiny --device cpu --time-budget 15  # schedule fitted to 15 min
    python main.py --arch tiny --device cpu --resume   # the same command, continued

A run is a folder (default runs/<timestamp>-<arch>) holding config.json, TensorBoard
events, metrics.jsonl (one line per finished epoch) and checkpoints/{last,best}.pt; see
runfolder.py. This file reads top to bottom: flags, config, the recipe (early stopping,
the training state a checkpoint holds), validation, the loop. Beside it: the datasets and
their order in data/loading.py, the LR schedule's shape and its fit to --time-budget in
schedule.py, stop signals in stopping.py, torchrun in distributed.py.
"""

from __future__ import annotations

import argparse
import copy
import io
import itertools
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from checkpoints import load_checkpoint, load_weights
from data.arrays import layout_type, split_holdout
from data.loading import (EpochSampler, check_train_shape, data_frame_size, epoch_order, make_datasets,
                          make_loaders, open_train_data)
from devices import (AMP_CHOICES, CONVS, autocast_context, pick_device, resolve_amp, set_up,
                     synchronize, use_conv)
from distributed import (agree, agree_max, all_sum, broadcast, close_distributed, init_distributed,
                         parallel, rank0_first)
from metrics import METRIC_NAMES, check_balance, check_thresholds, score
from model import build_model, check_preset, count_parameters, fit_to_data, frame_size, to_unit
from net_params import get_preset
from nowcast import BALANCE_THRESHOLDS, BALANCE_WEIGHTS, SCORE_NAMES
from pictures import prediction_grid
from runfolder import RunFolder, has_checkpoint, locate_run, new_run_dir, recorded_history
from schedule import (CALIBRATION_STEPS, CHECKPOINTS_PER_EPOCH, DECAYING, budget_warning, calibrate,
                      calibration_seconds, fit_length, fit_message, fitted_record, lr_factor, reanchor,
                      schedule_steps, shorten)
from stopping import Interrupted, StopRequest, worker_deaths
from training import LOSSES, grad_scaler, train_step
from utils import (DEFAULT_DATA_ROOT, ArgumentParser, UsageError, check, check_memory, first_line,
                   memory_available, rng_state, run_cli, seed_everything, set_rng_state)

# Flags that a resumed run may change: where and how this process runs, and how long it
# goes on. --lr too, as the advice after a NaN says; every change is recorded in the run.
# Any other flag fixes the experiment: repeating it with the same value is fine.
RESUMABLE = ("data_root", "no_download", "train_data", "device", "workers", "log_every", "conv",
             "amp", "compile", "epochs", "time_budget", "patience", "lr")
FLAG_KEYS = {"amp": "precision"}  # flags whose config key differs: --amp's is what it resolved to
# What every run's config holds (a stored config without them is damaged, not a run's).
REQUIRED_KEYS = ("arch", "model", "epochs", "epoch_size", "batch_size", "lr", "frames_input",
                 "frames_output", "seed")
SCHEDULES = ("plateau", "cosine", "onecycle")
OPTIMIZERS = ("adam", "adamw")


# ----------------------------------------------------------------------------------------
# Flags and config

def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Train a ConvLSTM/ConvGRU/TrajGRU encoder-forecaster.")
    p.add_argument("--arch", default="convlstm", metavar="NAME",
                   help="preset from net_params.PRESETS (default: convlstm)")
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT, metavar="DIR",
                   help=f"MNIST files; missing ones are downloaded (default: {DEFAULT_DATA_ROOT})")
    p.add_argument("--no-download", action="store_true",
                   help="never download; use only what is in --data-root")
    p.add_argument("--train-data", default=None, metavar="FILE",
                   help="train on your own sequences instead of Moving MNIST: FILE.npy, "
                        "FILE.npz or FILE.h5:DATASET (HDF5, read lazily; needs h5py); the "
                        "model takes its channel count and frame size; its tail is held out "
                        "(docs/own-data.md) (default: off)")
    p.add_argument("--layout", default=None, type=layout_type, metavar="AXES",
                   help="--train-data's axes in the file's order: N, T, H, W and optionally "
                        "C, e.g. NTHW, NTCHW, TNHW (make-test-set's) or NHWT (SEVIR) "
                        "(default: NTCHW for 5-D files; 4-D files must say)")
    p.add_argument("--value-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="--train-data's values are in their own units (dBZ, mm/h, ...) in "
                        "[LO, HI], mapped linearly to [0, 1] for training; values outside are "
                        "clipped; scores and load_model's predictions are in these units "
                        "(default: uint8 / 255, or floats already in [0, 1])")
    p.add_argument("--fill-nan", type=float, default=None, metavar="VALUE",
                   help="replace NaNs (missing pixels) in --train-data by VALUE, in the "
                        "data's units (default: NaNs are refused)")
    p.add_argument("--holdout-fraction", type=float, default=0.1, metavar="F",
                   help="share of --train-data held out for validation (default: 0.1)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="run folder (default: runs/<timestamp>-<arch>)")
    p.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="the schedule's length; on --resume, a new value makes a onecycle or "
                        "cosine LR go from where it is down to the schedule's end at the new "
                        "length (default: fitted to --time-budget for onecycle and cosine, "
                        "else the preset's, 200 for convlstm)")
    p.add_argument("--epoch-size", type=int, default=None, metavar="N",
                   help="Moving MNIST sequences per epoch; an epoch of --train-data is its "
                        "whole training part (default: the preset's, 10000 for convlstm; a "
                        "schedule fitted to --time-budget sizes it to fill the budget)")
    p.add_argument("--val-size", type=int, default=None, metavar="N",
                   help="fixed Moving MNIST validation sequences from held-out digits, scored "
                        "after every epoch; --train-data holds out --holdout-fraction instead "
                        "(default: the preset's, 1000 for convlstm, 250 for tiny)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="sequences per step and process (default: the preset's, 16 for convlstm)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: the preset's, 3e-4 for convlstm)")
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS,
                   help="Adam, or AdamW with decoupled --weight-decay (default: adam)")
    p.add_argument("--weight-decay", type=float, default=0.0, metavar="W", help="(default: 0)")
    p.add_argument("--schedule", default="onecycle", choices=SCHEDULES,
                   help="onecycle: Smith's one-cycle shape over --epochs, the recipe study's "
                        "winner; cosine: warm up, then cosine to 0; plateau: halve the LR after "
                        "4 epochs without a better val loss, as the original (default: onecycle)")
    p.add_argument("--warmup", type=float, default=None, metavar="F",
                   help="share of the steps spent warming up (cosine: 0.05, onecycle: 0.3)")
    p.add_argument("--loss", default="mse", choices=LOSSES,
                   help="per-pixel MSE, MSE + L1, or the balanced B-MSE (+ B-MAE) of Shi et "
                        "al. 2017 with --balance-thresholds and --balance-weights (default: mse)")
    p.add_argument("--thresholds", type=float, nargs="+", default=None, metavar="T",
                   help="also validate with POD, FAR, CSI, HSS and bias at these event "
                        "thresholds, in the data's units (value >= T is an event): "
                        "metrics.jsonl and TensorBoard's val/csi@T (default: none)")
    p.add_argument("--balanced", action="store_true",
                   help="also validate with B-MSE and B-MAE (Shi et al. 2017) (default: off)")
    p.add_argument("--balance-thresholds", type=float, nargs="+", default=list(BALANCE_THRESHOLDS),
                   metavar="T", help="bin edges of B-MSE / B-MAE and the b-mse losses, in the "
                                     "data's units (default: HKO-7's 2 5 10 30, mm/h)")
    p.add_argument("--balance-weights", type=float, nargs="+", default=list(BALANCE_WEIGHTS),
                   metavar="W", help="a weight per bin, one more than --balance-thresholds "
                                     "(default: HKO-7's 1 2 5 10 30)")
    p.add_argument("--clip", type=float, default=10.0,
                   help="gradient-norm clip; inf turns it off (default: 10)")
    p.add_argument("--patience", type=int, default=20, metavar="N",
                   help="early stopping: epochs without a better val loss (default: 20)")
    p.add_argument("--frames-input", type=int, default=None, metavar="T",
                   help="input frames (default: the preset's, 10)")
    p.add_argument("--frames-output", type=int, default=None, metavar="T",
                   help="predicted frames (default: the preset's, 10)")
    p.add_argument("--num-digits", type=int, nargs="+", default=[2], metavar="K",
                   help="digits per sequence, drawn from this list (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--device", default="auto",
                   help="auto, cuda, cuda:N, mps or cpu; auto prefers cuda, then mps (default: auto)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="DataLoader worker processes (default: up to 8 on CUDA, 1 elsewhere)")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="autocast precision; auto is bf16 on CUDA GPUs that support it and on "
                        "CPUs that run bf16 natively (AVX512-BF16, AMX, Arm BF16), else fp32; "
                        "a resumed run keeps its precision, auto resolved again on the new "
                        "device; fp16 on CUDA only (default: auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    p.add_argument("--conv", default="direct", choices=CONVS,
                   help="the cells' 5x5 convolutions: direct, or Winograd F(4x4, 5x5) from "
                        "tools/winograd.py, faster in fp32 on CPUs (default: direct)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop after this many minutes (validation included) with a checkpoint "
                        "that --resume continues exactly; it counts from this start, and a "
                        "resumed run has none unless given. A new onecycle or cosine run without "
                        "--epochs first times a few steps and a validation, then fits its epochs "
                        "to the budget, and their size without --epoch-size (config.json's "
                        "fitted; --resume keeps them); where a preset names a lighter one "
                        "(tiny: tiny_lite) and too few steps fit, it trains that instead. With "
                        "--epochs it keeps them and warns after epoch 1 if they won't fit; "
                        "plateau only stops (default: none)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue a run: PATH is its folder or checkpoint; alone, --out-dir's "
                        "run or the newest run that is not running (default: off)")
    p.add_argument("--log-every", type=int, default=20, metavar="N",
                   help="steps between loss logs; each log syncs the device (default: 20)")
    p.add_argument("--dry-run", action="store_true",
                   help="one epoch of one batch, a smoke test (default: off)")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, set[str]]:
    """The flags, and the names of those given explicitly (a resumed run keeps the rest)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return args, set(vars(parser.parse_args(argv)))


def check_flags(args: argparse.Namespace) -> None:
    """One line naming the flag, the value and what is allowed, before anything is made."""
    at_least = {"epochs": 1, "epoch_size": 1, "val_size": 1, "batch_size": 1, "patience": 1,
                "frames_input": 1, "frames_output": 1, "seed": 0, "workers": 0, "log_every": 1}
    for key, low in at_least.items():
        value = getattr(args, key, None)
        check(value is None or value >= low, f"--{key.replace('_', '-')} must be >= {low}, got {value}")
    for key in ("lr", "clip", "time_budget"):
        value = getattr(args, key, None)
        check(value is None or value > 0 and not math.isnan(value),
              f"--{key.replace('_', '-')} must be > 0, got {value}"
              + ("; use --clip inf to turn clipping off" if key == "clip" else ""))
    check(args.lr is None or math.isfinite(args.lr), f"--lr must be finite, got {args.lr}")
    check(min(args.num_digits) >= 1, f"--num-digits must be >= 1, got {args.num_digits}")
    check(0 < args.holdout_fraction < 1, f"--holdout-fraction must be in (0, 1), got {args.holdout_fraction}")
    check(args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}")
    check(args.warmup is None or 0 <= args.warmup < 1, f"--warmup must be in [0, 1), got {args.warmup}")
    check(args.warmup in (None, 0) or args.schedule != "plateau",
          "--warmup needs --schedule cosine or onecycle; plateau has no warm-up")
    check(args.resume != "", "--resume '' names no run; give a run folder or checkpoint, or --resume alone")
    if args.value_range is not None:
        lo, hi = args.value_range
        check(math.isfinite(lo) and math.isfinite(hi) and lo < hi,
              f"--value-range {lo:g} {hi:g}: LO must be below HI, both finite")
    check(args.fill_nan is None or math.isfinite(args.fill_nan),
          f"--fill-nan must be a finite number, got {args.fill_nan}")


def check_data_config(config: dict, given: set[str]) -> None:
    """The settings of your own data and of the nowcasting scores, as the run will use them
    (a resumed run's own included): one line each, before any work."""
    if not config["train_data"]:
        for key in ("layout", "value_range", "fill_nan"):
            check(config[key] is None,
                  f"--{key.replace('_', '-')} describes --train-data; give --train-data FILE too "
                  f"(Moving MNIST is uint8, mapped to [0, 1])")
    else:
        for flag in sorted({"epoch_size", "val_size"} & given):
            raise UsageError(f"--{flag.replace('_', '-')} sets Moving MNIST's sizes; with --train-data "
                             f"an epoch is every sequence of the file but its held-out tail "
                             f"(--holdout-fraction); leave --{flag.replace('_', '-')} out")
    if config["thresholds"]:
        check_thresholds("--thresholds", config["thresholds"], config["value_range"])
    if config["balanced"] or config["loss"].startswith("b-"):
        check_balance(config["balance_thresholds"], config["balance_weights"], config["value_range"])


def resolve_config(args: argparse.Namespace) -> dict:
    """Flags plus the preset's defaults -> the run's full config (saved as config.json)."""
    preset = get_preset(args.arch)
    if args.frames_input is not None:
        preset.frames_input = args.frames_input
    if args.frames_output is not None:
        preset.frames_output = args.frames_output
    check_preset(preset)
    # --amp is stored as asked ("auto" too) until main() resolves it on the device; the flag
    # itself stays, so that a resumed run resolves auto again on its own device
    config = {FLAG_KEYS.get(k, k): v for k, v in vars(args).items() if k not in ("resume", "out_dir")}
    config["amp_requested"] = args.amp
    for key in ("epochs", "batch_size", "lr", "epoch_size", "val_size"):  # flags override the preset's
        if config[key] is None:
            config[key] = getattr(preset, key)
    if config["warmup"] is None:
        config["warmup"] = {"plateau": 0.0, "cosine": 0.05, "onecycle": 0.3}[config["schedule"]]
    for key in ("data_root", "train_data"):  # a later --resume may run from another folder
        if config[key] is not None:
            config[key] = os.path.abspath(config[key])
    config["frames_input"], config["frames_output"] = preset.frames_input, preset.frames_output
    if config["train_data"]:  # the model takes the data's channels and frame size
        opened = open_train_data(config, guess_layout=False)
        n, _, channels, height, width = opened.sequences.shape
        check_train_shape(opened, config, preset)
        preset = fit_to_data(preset, channels, (height, width))
        config["layout"] = opened.layout
        train, val = split_holdout(n, config["holdout_fraction"])
        config["epoch_size"], config["val_size"] = len(train), len(val)  # what an epoch is
    config["model"] = preset.to_dict()
    if args.dry_run:  # one global batch
        world = int(os.environ.get("WORLD_SIZE", "1"))
        config.update(epochs=1, epoch_size=config["batch_size"] * world,
                      val_size=min(config["val_size"], config["batch_size"]))
    elif args.time_budget is not None and args.epochs is None and config["schedule"] in DECAYING:
        # train() fits the epochs to the budget (fit_to_budget), and their size where it is free
        config["fitted"] = {"free_epoch_size": args.epoch_size is None and not config["train_data"]}
        if preset.lighter is not None:  # checked now, before any work; trained where it is slow
            config["fitted"]["lighter"] = {"arch": preset.lighter, "below": preset.lighter_below,
                                           "model": lighter_model(preset).to_dict()}
    return config


def lighter_model(preset):
    """The preset that `preset.lighter` names, for the same frames as `preset`."""
    lighter = get_preset(preset.lighter)
    lighter.frames_input, lighter.frames_output = preset.frames_input, preset.frames_output
    return fit_to_data(lighter, preset.frame_channels, frame_size(preset))


# Settings that configs written before a flag existed imply.
LEGACY = {"optimizer": "adam", "weight_decay": 0.0, "schedule": "plateau", "warmup": 0.0,
          "loss": "mse", "conv": "direct", "layout": None, "value_range": None, "fill_nan": None,
          "thresholds": None, "balanced": False, "balance_thresholds": list(BALANCE_THRESHOLDS),
          "balance_weights": list(BALANCE_WEIGHTS)}


def upgrade_config(stored: dict) -> dict:
    """A config of any version in this version's keys (checkpoints and config.json of
    earlier versions resume as they were)."""
    config = {**LEGACY, **stored}
    if config["conv"] not in CONVS:  # "auto" of older versions
        config["conv"] = "direct"
    # Before this version config["amp"] held the --amp flag and config["precision"] what it
    # resolved to at the last start; the precision is now the one key.
    # Configs without "amp_requested" keep their precision on resume: only "auto" resolves again.
    amp = config.pop("amp", None)
    config.setdefault("precision", amp or "auto")
    config.setdefault("amp_requested", amp)
    return config


def resumed_config(stored: dict, args: argparse.Namespace, given: set[str], run: Path,
                   source: Path | None = None) -> dict:
    """A run's stored config (read from `source`, its checkpoint or config.json) with the
    flags given again: experiment flags must repeat their value; RESUMABLE ones may change,
    and each change is recorded under "resumes".

    The run keeps its precision unless --amp is given again; a given --amp counts as the
    precision it means on this run's device. A run started with --amp auto resolves auto
    again on this device: bf16 from a GPU becomes fp32 on a CPU without native bf16.
    The process count is part of the experiment through the global batch: another count
    goes on only with a --batch-size that keeps it.
    """
    missing = [k for k in REQUIRED_KEYS if k not in stored] if isinstance(stored, dict) else ["all"]
    check(not missing, f"the config in {source or run} lacks {', '.join(missing)} (damaged, or not "
                       f"written by main.py), so the run can't be resumed; start a new run with "
                       f"another --out-dir")
    config = upgrade_config(stored)
    config["time_budget"] = None  # a budget is this process's: only a given one applies
    changed = {}
    old_world, world = config.get("world_size", 1), int(os.environ.get("WORLD_SIZE", "1"))
    if "amp" in given:
        config["amp_requested"] = args.amp
    again = "amp" in given or config["amp_requested"] == "auto"
    flags = sorted(given - {"resume", "out_dir", "amp"}) + ["amp"] * again  # --device first
    for flag in flags:
        key, new = FLAG_KEYS.get(flag, flag), getattr(args, flag)
        if flag in ("data_root", "train_data") and new is not None:
            new = os.path.abspath(new)
        if flag == "amp":
            new = resolve_amp(config["amp_requested"], pick_device(config["device"]))
        old = config.get(key)
        if old == new or (flag == "batch_size" and world != old_world):
            continue
        check(flag in RESUMABLE, f"--{flag.replace('_', '-')} was {old!r} when {run} started and "
                                 f"can't change on --resume (you gave {new!r}); repeat it or leave "
                                 f"it out, or start a new run with another --out-dir")
        config[key], changed[key] = new, [old, new]
    if world != old_world:
        old_batch = config["batch_size"]
        batch = args.batch_size if "batch_size" in given else old_batch
        check(world * batch == old_world * old_batch, process_count_advice(run, old_world, old_batch,
                                                                           world, batch))
        changed["world_size"], config["world_size"] = [old_world, world], world
        if batch != old_batch:
            changed["batch_size"], config["batch_size"] = [old_batch, batch], batch
    if changed:
        config["resumes"] = [*config.get("resumes", []), {"changed": changed}]
    return config


def launch(world: int) -> str:
    """The command that starts main.py in `world` processes."""
    return f"torchrun --nproc_per_node={world} main.py" if world > 1 else "python main.py"


def process_count_advice(run: Path, old_world: int, old_batch: int, world: int, batch: int) -> str:
    """Why another process count is refused, with the command that keeps the global batch."""
    total = old_world * old_batch
    fix = (f"keep it with: {launch(world)} --resume {run} --batch-size {total // world}"
           if total % world == 0 else
           f"{world} processes can't share it; resume with {old_world}: {launch(old_world)} --resume {run}")
    return (f"{run} trained with {old_world} process(es) of --batch-size {old_batch}, a global batch "
            f"of {total}; {world} x {batch} would change the experiment: {fix}")


def plan_run(args: argparse.Namespace, given: set[str]) -> tuple[dict, Path | None, dict | None, Path | None]:
    """(config, run folder, checkpoint to resume or None, the run a fork copies best.pt from).

    The folder is None for a new run in runs/<timestamp>-<arch> (named on rank 0 later).
    """
    check_flags(args)
    if args.dry_run:
        args.epoch_size = None  # one global batch, set by resolve_config
    where = locate_run(args.resume, args.out_dir)
    if where.checkpoint is None:
        if where.restart is not None:  # a run that stopped before its first checkpoint starts again
            config = resumed_config(where.restart, args, given, where.folder, where.folder / "config.json")
        else:
            config = resolve_config(args)
        check_data_config(config, given)
        return config, where.folder, None, None
    try:
        checkpoint = load_checkpoint(where.checkpoint)
    except UsageError as err:
        if not where.in_place:
            raise
        raise UsageError(damaged_last(where.source, err)) from None
    check("optimizer" in checkpoint, f"{where.checkpoint} holds no optimizer state (a converted or "
                                     f"exported model?); evaluate it with evaluate.py, or start a new run")
    config = resumed_config(checkpoint["config"], args, given, where.source or where.checkpoint,
                            where.checkpoint)
    check_data_config(config, given)
    if "history" not in checkpoint:  # written before checkpoints carried it
        checkpoint["history"] = recorded_history(where.source, checkpoint["epoch"])
    if not where.in_place:
        config["forked_from"] = str(where.checkpoint)
    return config, where.folder, checkpoint, None if where.in_place else where.source


def damaged_last(run: Path, err: UsageError) -> str:
    """One line for a last.pt that doesn't load: how to go on from best.pt, if it does."""
    best = run / "checkpoints" / "best.pt"
    try:
        fix = (f"its best.pt (epoch {load_checkpoint(best)['epoch']}) is intact: continue from it in "
               f"a new folder with {launch(int(os.environ.get('WORLD_SIZE', '1')))} --resume {best} "
               f"--out-dir NEW_FOLDER")
    except (UsageError, KeyError):
        fix = "there is no intact best.pt either: start a new run with another --out-dir"
    reason = first_line(err.__cause__) if err.__cause__ else str(err)
    return f"{run / 'checkpoints' / 'last.pt'} is damaged ({reason[:150]}); {fix}"


# ----------------------------------------------------------------------------------------
# Set-up: the device, the process, the data, the folder; then the loop (train, below)

def main(argv=None) -> dict:
    args, given = parse_args(argv)
    config, run_dir, checkpoint, fork_source = plan_run(args, given)
    rank, world, device = init_distributed(config["device"])
    clean = False  # every process ends alike: leave the process group together
    try:
        # What --amp means on this device, --conv checked against it, and the process-wide
        # speed settings for it, chosen once (docs/speed.md).
        config["precision"], memory_format = set_up(device, config["precision"], config["conv"])
        if config["workers"] is None:
            config["workers"] = min(8, (os.cpu_count() or 1) // world) if device.type == "cuda" else 1
        train_set, val_set = rank0_first(rank, make_datasets, config, rank == 0)
        B = config["batch_size"]
        check(len(train_set) >= B * world,
              f"an epoch of {len(train_set)} sequences gives no full batch of {B} x {world} "
              f"process(es); lower --batch-size or raise --epoch-size")
        check_step_memory(config, data_frame_size(train_set), device)
        if run_dir is None:
            run_dir = broadcast(new_run_dir(config["arch"]) if rank == 0 else None, rank)
        config["world_size"] = world
        result = train(config, RunFolder(run_dir, rank == 0), checkpoint, fork_source, train_set,
                       val_set, rank, world, device, memory_format)
        clean = True
        return result
    except Interrupted:
        clean = True
        raise
    finally:
        close_distributed(clean)


def check_step_memory(config: dict, frame: tuple[int, int], device: torch.device) -> None:
    """Refuse, before anything starts, a training step that can't fit in memory.

    The estimate is a lower bound: every stage's hidden state at every frame of the batch,
    which the backward pass keeps, in float32 (the gates and convolutions need several times
    more). Frames of 4096x4096 px make it hundreds of GiB at --batch-size 1.
    """
    height, width = frame
    B, T = config["batch_size"], config["frames_input"] + config["frames_output"]
    needed, stride = 0, 1
    for stage in config["model"]["stages"]:
        stride *= stage["down"]["stride"]
        needed += B * T * stage["hidden"] * (height // stride) * (width // stride) * 4
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu":
        available = memory_available()
    else:
        return
    check_memory(needed, f"a training step of --batch-size {B} on {T} frames of {height}x{width} px",
                 "lower --batch-size, or use smaller frames", available)


# ----------------------------------------------------------------------------------------
# Training state: what a checkpoint holds

# Frames lie in [0, 1], so a prediction in that range has a per-pixel loss of at most 1 (2
# for mse+l1). A loss above that and 1000 times its first logged value comes from weights
# that left the data's range: --lr 10 gets there within tens of steps, and never recovers.
DIVERGED, LOSS_BOUND = 1e3, 2.0


class EarlyStopping:
    """Stop when the val loss hasn't improved for `patience` epochs, or at once when the
    training loss diverged (DIVERGED times its first logged value, the run's reference)."""

    def __init__(self, patience: int):
        self.patience, self.best, self.bad_epochs = patience, math.inf, 0
        self.first_loss = None

    def diverged(self, train_loss: float) -> bool:
        if self.first_loss is None:
            self.first_loss = train_loss
        return train_loss > max(DIVERGED * self.first_loss, LOSS_BOUND)

    def update(self, val_loss: float) -> bool:
        """Record an epoch; True if it is the best so far."""
        if val_loss < self.best:
            self.best, self.bad_epochs = val_loss, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "first_loss": self.first_loss}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
        self.first_loss = state.get("first_loss")


class TrainState:
    """Model, optimizer, LR schedule, early stopping and the position in the run: the
    state a checkpoint holds, and the one optimisation step that advances it."""

    def __init__(self, config: dict, model: torch.nn.Module, steps_per_epoch: int,
                 device: torch.device, rank: int = 0, world: int = 1):
        self.config, self.model, self.device, self.rank, self.world = config, model, device, rank, world
        self.steps_per_epoch = steps_per_epoch
        decay = config["weight_decay"]
        opt = torch.optim.AdamW if config["optimizer"] == "adamw" else torch.optim.Adam
        self.optimizer = opt(model.parameters(), lr=config["lr"], weight_decay=decay)
        if config["schedule"] == "plateau":  # factor 0.5 and patience 4, as in the original repo
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=0.5,
                                                                        patience=4)
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: self.factor(s))
        self.stopper = EarlyStopping(config["patience"])
        self.scaler = grad_scaler(device, config["precision"])
        # The network trains on [0, 1]: batches come in the data's units, and the balanced
        # loss's bins are mapped there too.
        self.value_range = config["value_range"]
        self.balance = ([to_unit(t, self.value_range) for t in config["balance_thresholds"]],
                        config["balance_weights"])
        self.epoch, self.position, self.step, self.history = 0, 0, 0, []
        self.loss_sum = torch.zeros((), device=device)  # this epoch's losses, summed on the device

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def total_steps(self) -> int:
        """The schedule's length in steps, which `shorten` may change after an epoch."""
        return schedule_steps(self.config, self.steps_per_epoch)

    def factor(self, step: int) -> float:
        """The LR at `step` as a share of the peak (onecycle, cosine; schedule.py)."""
        return lr_factor(self.config["schedule"], self.config["warmup"], step, self.total_steps,
                         self.config.get("anneal"))

    def train_step(self, model, inputs, targets, amp_ctx) -> None:
        inputs, targets = to_unit(inputs, self.value_range), to_unit(targets, self.value_range)
        self.loss_sum += train_step(model, self.optimizer, self.scaler, inputs, targets, amp_ctx,
                                    self.config["clip"], self.config["loss"], self.balance)
        if self.config["schedule"] != "plateau":
            self.scheduler.step()
        self.step += 1

    def epoch_losses(self) -> list[float]:
        """Every process's running loss sum of this epoch (float32 values, exactly)."""
        own = torch.zeros(self.world, dtype=torch.float64)
        own[self.rank] = self.loss_sum.double().cpu()
        return all_sum(own).tolist()

    def end_epoch(self, val_loss: float, metrics: dict, seconds: float) -> bool:
        """Record a finished epoch in the history; True if its val loss is the best so far."""
        steps = self.step - self.epoch * self.steps_per_epoch  # fewer where a schedule ends inside it
        train_loss = sum(self.epoch_losses()) / (self.world * max(steps, 1))
        improved = self.stopper.update(val_loss)
        if self.config["schedule"] == "plateau":
            self.scheduler.step(val_loss)
        self.history.append({"epoch": self.epoch + 1, "step": self.step, "train_loss": train_loss,
                             "val_loss": val_loss, **{k: metrics[k] for k in METRIC_NAMES},
                             **{k: metrics[k] for k in NOWCAST_KEYS if k in metrics},
                             "lr": self.lr, "seconds": round(seconds, 2)})
        self.epoch, self.position = self.epoch + 1, 0
        self.loss_sum.zero_()
        return improved

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "early_stopping": self.stopper.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "position": self.position,
            "step": self.step, "epoch_losses": self.epoch_losses(), "history": self.history,
            "rng": rng_state(), "config": self.config,
        }

    def load_state_dict(self, state: dict, source) -> None:
        """Continue from a checkpoint; `source`, its file, names it in errors."""
        advice = "evaluate it with evaluate.py, or start a new run"
        load_weights(self.model, state["model"], source, advice)
        load_weights(self.optimizer, state["optimizer"], source, advice)
        self.scheduler.load_state_dict(state["scheduler"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.stopper.patience = self.config["patience"]
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.position, self.history = state.get("position", 0), state.get("history", [])
        losses = state.get("epoch_losses") or [0.0]
        # Each process's own running sum where the process count is unchanged (exact).
        own = losses[self.rank] if len(losses) == self.world else \
            (sum(losses) if self.rank == 0 else 0.0)
        self.loss_sum.fill_(own)

    def set_peak_lr(self, lr: float) -> None:
        """A new --lr on resume: the schedule goes on from its position at the new peak."""
        for group in self.optimizer.param_groups:
            group["initial_lr"] = lr
            group["lr"] = lr if self.config["schedule"] == "plateau" else lr * self.factor(self.step)
        if self.config["schedule"] != "plateau":
            self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)


# ----------------------------------------------------------------------------------------
# Validation

NOWCAST_KEYS = ("b_mse", "b_mae", "thresholds")  # what --balanced and --thresholds add to an epoch


def scoring(config: dict) -> dict:
    """metrics.score's keywords for the run: its units, and the nowcasting scores asked for."""
    balance = (config["balance_thresholds"], config["balance_weights"]) if config["balanced"] else None
    return dict(value_range=config["value_range"], thresholds=config["thresholds"], balance=balance)


def nowcast_scalars(metrics: dict) -> dict:
    """TensorBoard tags of the nowcasting scores: val/csi@T (means over lead times), val/b_mse."""
    scalars = {f"val/{name}@{key}": scores[name] for key, scores in metrics.get("thresholds", {}).items()
               for name in SCORE_NAMES if scores[name] is not None}  # undefined: not drawn
    return {**scalars, **{f"val/{k}": metrics[k] for k in ("b_mse", "b_mae") if k in metrics}}


def validate(model, loader, device, amp_ctx, frames_output: int, **options) -> tuple[float, dict, tuple]:
    """Mean per-pixel MSE on [0, 1] (the training loss) and the field's metrics on the fixed
    set, in the data's units; `options` as metrics.score takes them (scoring(config)).

    Under torchrun each process scores its shard and the sums are all-reduced, so the
    result equals one process scoring the whole set. Returns (val_loss, metrics, this
    process's first batch (inputs, targets, predictions) on [0, 1]).
    """
    scores = score(model, loader, device, amp_ctx, frames_output, **options)
    metrics = scores.metrics["model"]
    metrics.load_tensor(all_sum(metrics.as_tensor()))
    loss = all_sum(scores.loss_sums)
    return (loss[0] / loss[1]).item(), metrics.compute(), scores.first_batch


def stop_advice(run: RunFolder, state: TrainState) -> str:
    """What a run stopped for a bad loss holds, and the command that goes on."""
    saved = (f"{run.checkpoints / 'last.pt'} holds epoch {state.epoch} (step {state.step - 1} "
             f"at most); resume with a lower --lr: {launch(state.world)} --resume {run.path} --lr LR"
             if has_checkpoint(run.path) else
             f"nothing was saved, so the same command with a lower --lr starts {run.path} again")
    return f"stopped without saving. {saved}. Or use --amp none / bf16 instead of fp16"


def check_finite(value: float, what: str, step: int, run: RunFolder, state: TrainState) -> None:
    if not math.isfinite(value):
        raise UsageError(f"{what} is {value} at step {step}; {stop_advice(run, state)}")


def check_diverged(window: float, step: int, run: RunFolder, state: TrainState) -> None:
    if state.stopper.diverged(window):
        raise UsageError(f"the training loss is {window:.3g} at step {step}, over {DIVERGED:g} times "
                         f"its first logged value {state.stopper.first_loss:.3g}: training diverged; "
                         f"{stop_advice(run, state)}")


# ----------------------------------------------------------------------------------------
# The loop

def build(config: dict, device: torch.device, memory_format, world: int):
    """(the model, what runs it: compiled and/or wrapped in DDP as the config says)."""
    seed_everything(config["seed"])
    model = build_model(config["model"]).to(device, memory_format=memory_format)
    use_conv(model, config["conv"])
    runnable = torch.compile(model) if config["compile"] else model
    return model, parallel(runnable, device, world)



def fit_to_budget(state: TrainState, runnable, datasets, loaders, amp_ctx, deadline: float,
                  log, rebuild) -> tuple[TrainState, object]:
    """Time this machine on a throw-away start, fix the schedule's epochs (and the size of a
    Moving MNIST epoch, where --epoch-size wasn't given) to what fits before `deadline`
    (schedule.py), record them in the config, and return a fresh training state from the
    very same start (weights, RNG states, a new optimizer) and what runs its model.

    Where the preset names a lighter one and fewer than its `lighter_below` steps fit, the
    lighter model is built (`rebuild()`: the model and what runs it, from config["model"]),
    timed and fitted instead, and config["model"] becomes it."""
    config, rank = state.config, state.rank
    lighter = config["fitted"].get("lighter")
    free = config["fitted"].get("free_epoch_size", False)

    def measure(state, runnable):  # the speed, the seconds left, and fit_length's answer
        speed = time_steps(state, runnable, datasets, loaders, amp_ctx, deadline)
        seconds_left = broadcast(deadline - time.time(), rank)
        return (speed, seconds_left, *fit_length(speed, state.steps_per_epoch, seconds_left, free))

    speed, seconds_left, epochs, steps, fits = measure(state, runnable)
    instead = None
    if lighter is not None and epochs * steps < lighter["below"]:
        instead = {"arch": config["arch"], "steps": epochs * steps, "step_seconds": round(speed.step, 4)}
        config["model"] = lighter["model"]
        model, runnable = rebuild()
        state = TrainState(config, model, state.steps_per_epoch, state.device, rank, state.world)
        log(f"{config['arch']} fits {epochs * steps:,} steps in the budget here ({speed.step:.3g} s a "
            f"step), fewer than {lighter['below']:,}: training the lighter {lighter['arch']} instead "
            f"({count_parameters(model):,} parameters; give --epochs to train {config['arch']} as it is)")
        speed, seconds_left, epochs, steps, fits = measure(state, runnable)
    resized = steps != state.steps_per_epoch
    if resized:  # Moving MNIST makes any number of sequences an epoch
        config["epoch_size"] = datasets[0].length = steps * config["batch_size"] * state.world
    config["fitted"] = fitted_record(speed, epochs, steps, seconds_left)
    if instead is not None:
        config["fitted"]["instead_of"] = instead
    config["epochs"] = epochs
    log(fit_message(config, config["fitted"], fits, resized))
    return TrainState(config, state.model, steps, state.device, rank, state.world), runnable


def time_steps(state: TrainState, runnable, datasets, loaders, amp_ctx, deadline: float):
    """schedule.calibrate on this run: its first batches trained and its validation set
    scored, then the weights and RNG states put back as they were. Rank 0's speed."""
    config, model, device, rank, world = state.config, state.model, state.device, state.rank, state.world
    (train_set, _), (sampler, train_loader, val_loader) = datasets, loaders
    B, start = config["batch_size"], (copy.deepcopy(model.state_dict()), rng_state())
    first = EpochSampler()
    first.set(epoch_order(train_set, config, 0), 0, B, rank, world)
    share = list(itertools.islice(first, 4 * CALIBRATION_STEPS * B))  # this process's first batches
    val_shard = val_loader.dataset

    def train_steps(n):  # epoch 0's first batches, over again if it has fewer
        sampler.set([share[i % len(share)] for i in range(n * B)], 0, B, 0, 1)
        for inputs, targets in train_loader:
            state.train_step(runnable, inputs.to(device), targets.to(device), amp_ctx)

    def validate_batches(n):  # this process's shard, over again if it has fewer
        indices = [i % len(val_shard) for i in range(n * B)] if len(val_shard) else []
        validate(runnable, DataLoader(Subset(val_shard, indices), batch_size=B), device, amp_ctx,
                 config["frames_output"])

    speed = calibrate(train_steps, validate_batches, len(val_loader),
                      lambda: torch.save(state.state_dict(), io.BytesIO()), lambda: synchronize(device),
                      calibration_seconds(deadline - time.time()))
    model.load_state_dict(start[0])
    set_rng_state(start[1])
    return broadcast(speed, rank)  # every process trains rank 0's length


def train(config, run, checkpoint, fork_source, train_set, val_set, rank, world, device,
          memory_format) -> dict:
    """Epochs of steps, validation and checkpoints, until the epochs, early stopping, the
    time budget or a stop signal end them. Only rank 0 writes files and draws progress bars."""
    log = tqdm.write if rank == 0 else (lambda *a, **k: None)
    model, runnable = build(config, device, memory_format, world)
    B = config["batch_size"]
    state = TrainState(config, model, len(train_set) // (B * world), device, rank, world)
    notes = []  # what this resume changed, said after the run's first line
    if checkpoint is not None:
        state.load_state_dict(checkpoint, config.get("forked_from") or run.checkpoints / "last.pt")
        before = checkpoint["config"]
        notes.append(reanchor(config, before, state.step, state.steps_per_epoch))  # a new --epochs
        if before["lr"] != config["lr"]:  # a new --lr on resume
            state.set_peak_lr(config["lr"])
        if before.get("precision", config["precision"]) != config["precision"]:
            old, asked = before["precision"], config["amp_requested"]
            notes.append(f"precision {old} -> {config['precision']}: --amp {asked} means "
                         f"{config['precision']} on this {device.type}"
                         + (f"; add --amp {old} to keep {old}" if asked == "auto" else ""))
    sampler, train_loader, val_loader = make_loaders(train_set, val_set, config, device, rank, world)
    amp_ctx = autocast_context(device, config["precision"])
    log(f"run {run.path}: {config['arch']} ({count_parameters(model):,} parameters) on {world} x "
        f"{device}, batch {B}{' per process' if world > 1 else ''}, lr {config['lr']:g} "
        f"({config['schedule']}), amp {config['precision']}"
        + (f", resuming at epoch {state.epoch + 1}, step {state.step}" if checkpoint else ""))
    for note in filter(None, notes):
        log(note)
    deadline = None if config["time_budget"] is None else time.time() + 60 * config["time_budget"]
    if checkpoint is None and deadline is not None and config.get("fitted") is not None:
        size = len(train_set)
        state, runnable = fit_to_budget(state, runnable, (train_set, val_set),
                                        (sampler, train_loader, val_loader), amp_ctx, deadline, log,
                                        lambda: build(config, device, memory_format, world))
        if len(train_set) != size:  # the fit sized the epochs: new workers, which see the size
            sampler, train_loader, val_loader = make_loaders(train_set, val_set, config, device, rank, world)
    first_epoch = state.epoch
    forking = checkpoint is not None and not has_checkpoint(run.path)
    with run.opened(config, checkpoint, fork_source), StopRequest() as stop, worker_deaths(run):
        if forking:  # from its start a fork's folder holds a last.pt, to resume or fork again
            run.save(state.state_dict())
        while state.epoch < config["epochs"]:
            if state.epoch > first_epoch and deadline is not None and agree(time.time() > deadline):
                log(f"time budget of {config['time_budget']:g} min reached after epoch {state.epoch}")
                break
            t0, whole = time.time(), state.position == 0  # a resumed epoch's time is a part
            sampler.set(epoch_order(train_set, config, state.epoch), state.position, B, rank, world)
            why = train_epoch(state, runnable, train_loader, amp_ctx, run, stop, deadline)
            if why:
                run.save(state.state_dict())
                message = (f"stopped by {why} at epoch {state.epoch + 1}, step {state.step}; "
                           f"saved {run.checkpoints / 'last.pt'}; continue with the same command "
                           f"and --resume, or: {launch(world)} --resume {run.path}")
                if why != "the time budget":
                    raise Interrupted(message, stop.signum)
                log(message)
                break
            val_loss, metrics, first = validate(runnable, val_loader, device, amp_ctx,
                                                config["frames_output"], **scoring(config))
            check_finite(val_loss, "the validation loss", state.step, run, state)
            improved = state.end_epoch(val_loss, metrics, time.time() - t0)
            shortened = None
            if whole and deadline is not None and "epochs" in (config.get("fitted") or {}):
                seconds = time.time() - t0 + CHECKPOINTS_PER_EPOCH * config["fitted"]["checkpoint_seconds"]
                shortened = shorten(config, state.epoch, state.steps_per_epoch,
                                    *broadcast((seconds, deadline - time.time()), rank))
            run.save(state.state_dict(), improved)
            result = state.history[-1]
            run.log(state.step, {"train/epoch_loss": result["train_loss"], "val/loss": val_loss,
                                 **{f"val/{k}": metrics[k] for k in METRIC_NAMES},
                                 **nowcast_scalars(metrics), "lr": state.lr},
                    prediction_grid(*first) if rank == 0 else None)
            csi = "".join(f"  csi@{k} {v['csi']:.3f}" for k, v in metrics.get("thresholds", {}).items()
                          if v["csi"] is not None)
            log(f"epoch {result['epoch']}/{config['epochs']}  train {result['train_loss']:.5f}  "
                f"val {val_loss:.5f}  mse {metrics['mse']:.4g}  ssim {metrics['ssim']:.4f}{csi}  "
                f"lr {state.lr:.2g}  {result['seconds']:.0f}s{'  *best' if improved else ''}")
            if shortened:
                log(shortened)
                run.write_config(config)
            if checkpoint is None and state.epoch == 1 and deadline is not None and "fitted" not in config:
                warning = budget_warning(config, time.time() - t0, deadline - time.time(), 1)
                if warning:  # explicit --epochs that the measured first epoch says won't fit
                    log(warning)
            if state.stopper.should_stop:
                log(f"early stopping: no better val loss for {state.stopper.patience} epochs")
                break
    return state.history[-1] if state.history else {}



def train_epoch(state: TrainState, model, loader, amp_ctx, run: RunFolder, stop: StopRequest,
                deadline: float | None) -> str | None:
    """Train the rest of the current epoch. Returns why it stopped early, or None at its end.

    The device syncs only every --log-every steps (and at the epoch's last step): then the
    loss is logged, and all processes agree whether the budget is over. Whether a signal
    came, they agree after every step (a CPU all-reduce of one number), so that all stop at
    the step after the first one that got it, well within torchrun's grace period.
    """
    config, B, world = state.config, state.config["batch_size"], state.world
    device, log_every = state.device, config["log_every"]
    steps = len(loader)
    logged = (state.step, sum(state.epoch_losses()))
    t0 = time.time()
    bar = tqdm(loader, desc=f"epoch {state.epoch + 1}", leave=False, dynamic_ncols=True,
               disable=state.rank != 0)
    for k, (inputs, targets) in enumerate(bar, start=1):
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        state.train_step(model, inputs, targets, amp_ctx)
        state.position += B * world
        signum = agree_max(stop.signum) if world > 1 else stop.signum
        last = k == steps or state.step >= state.total_steps  # a shortened schedule ends inside it
        if k % log_every and not last and not signum:
            continue
        late = agree(deadline is not None and time.time() > deadline)
        total = sum(state.epoch_losses())
        window = (total - logged[1]) / (world * (state.step - logged[0]))
        check_finite(window, "the training loss", state.step, run, state)
        check_diverged(window, state.step, run, state)
        run.log(state.step, {"train/loss": window, "train/lr": state.lr})
        bar.set_postfix(loss=f"{window:.5f}", seq_s=f"{k * B * world / (time.time() - t0):.1f}")
        logged = (state.step, total)
        if signum or (late and not last):
            bar.close()
            stop.signum = signum  # another process's, under torchrun
            return signal.Signals(signum).name if signum else "the time budget"
        if last:
            break
    bar.close()
    return None


if __name__ == "__main__":
    sys.exit(run_cli(main))
