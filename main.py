"""Train an encoder-forecaster on Moving MNIST (or your own sequences).

    python main.py                                     # convlstm, the original's setting
    python main.py --arch tiny --device cpu --time-budget 15
    python main.py --arch tiny --device cpu --resume   # the same command, continued

A run is a folder (default runs/<timestamp>-<arch>) holding config.json, TensorBoard
events, metrics.jsonl (one line per finished epoch) and checkpoints/{last,best}.pt; see
RunFolder. This file reads top to bottom: flags, config, the run folder, the loop.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from data.mm import MovingMNIST, SequenceArrayDataset, load_sequences, split_holdout
from model import build_model, check_preset, count_parameters
from net_params import get_preset
from utils import (AMP_CHOICES, LOSSES, METRIC_NAMES, TMP_SUFFIX, ArgumentParser, UsageError,
                   atomic_save, atomic_write_text, autocast_context, check, configure_process,
                   load_checkpoint, pick_device, prediction_grid, resolve_amp, rng_state,
                   run_cli, score, seed_everything, set_rng_state, train_step)

# Flags that a resumed run may change: where and how this process runs, and how long it
# goes on. --lr too, as the advice after a NaN says; every change is recorded in the run.
# Any other flag fixes the experiment: repeating it with the same value is fine.
RESUMABLE = ("data_root", "no_download", "train_data", "device", "workers", "log_every", "conv",
             "amp", "compile", "epochs", "time_budget", "patience", "lr")
SCHEDULES = ("plateau", "cosine", "onecycle")
OPTIMIZERS = ("adam", "adamw")


# ----------------------------------------------------------------------------------------
# Flags and config

def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Train a ConvLSTM/ConvGRU/TrajGRU encoder-forecaster.")
    p.add_argument("--arch", default="convlstm", metavar="NAME",
                   help="preset from net_params.PRESETS (default: convlstm)")
    p.add_argument("--data-root", default="data/mnist", metavar="DIR",
                   help="MNIST files; missing ones are downloaded (default: data/mnist)")
    p.add_argument("--no-download", action="store_true",
                   help="never download; use only what is in --data-root")
    p.add_argument("--train-data", default=None, metavar="FILE",
                   help="train on your own .npy/.npz sequences (N,T,H,W) or (N,T,C,H,W) "
                        "instead of Moving MNIST; its tail is held out (default: off)")
    p.add_argument("--holdout-fraction", type=float, default=0.1, metavar="F",
                   help="share of --train-data held out for validation (default: 0.1)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="run folder (default: runs/<timestamp>-<arch>)")
    p.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="(default: the preset's, 200 for convlstm)")
    p.add_argument("--epoch-size", type=int, default=None, metavar="N",
                   help="sequences per epoch (default: the preset's, 10000 for convlstm)")
    p.add_argument("--val-size", type=int, default=1000, metavar="N",
                   help="fixed validation sequences from held-out digits (default: 1000)")
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
                   help="per-pixel MSE, or MSE + L1 (default: mse)")
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
                   help="autocast precision; auto is bf16 on CUDA GPUs that support it and "
                        "fp32 elsewhere (CPU bf16 is fast only with AVX512-BF16 or AMX); fp16 "
                        "on CUDA only (default: auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    p.add_argument("--conv", default="direct", choices=("direct", "winograd"),
                   help="the cells' 5x5 convolutions: direct, or Winograd F(4x4, 5x5) from "
                        "tools/winograd.py, faster in fp32 on CPUs (default: direct)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop after this many minutes (validation included) with a checkpoint "
                        "that --resume continues exactly; it counts from this start, and a "
                        "resumed run has none unless given (default: none)")
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


def resolve_config(args: argparse.Namespace) -> dict:
    """Flags plus the preset's defaults -> the run's full config (saved as config.json)."""
    preset = get_preset(args.arch)
    if args.frames_input is not None:
        preset.frames_input = args.frames_input
    if args.frames_output is not None:
        preset.frames_output = args.frames_output
    check_preset(preset)
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "out_dir")}
    for key in ("epochs", "batch_size", "lr", "epoch_size"):  # flags override the preset's
        if config[key] is None:
            config[key] = getattr(preset, key)
    if config["warmup"] is None:
        config["warmup"] = {"plateau": 0.0, "cosine": 0.05, "onecycle": 0.3}[config["schedule"]]
    for key in ("data_root", "train_data"):  # a later --resume may run from another folder
        if config[key] is not None:
            config[key] = os.path.abspath(config[key])
    config["frames_input"], config["frames_output"] = preset.frames_input, preset.frames_output
    config["model"] = preset.to_dict()
    if args.dry_run:  # one global batch
        world = int(os.environ.get("WORLD_SIZE", "1"))
        config.update(epochs=1, epoch_size=config["batch_size"] * world,
                      val_size=min(config["val_size"], config["batch_size"]))
    return config


# Settings that configs written before a flag existed imply.
LEGACY = {"optimizer": "adam", "weight_decay": 0.0, "schedule": "plateau", "warmup": 0.0,
          "loss": "mse", "conv": "direct"}


def resumed_config(stored: dict, args: argparse.Namespace, given: set[str], run: Path) -> dict:
    """A run's stored config with the flags given again: experiment flags must repeat their
    value; RESUMABLE ones may change, and each change is recorded under "resumes"."""
    config = {**LEGACY, **stored}
    if config["conv"] not in ("direct", "winograd"):  # "auto" of older versions
        config["conv"] = "direct"
    config["time_budget"] = None  # a budget is this process's: only a given one applies
    changed = {}
    for key in sorted(given - {"resume", "out_dir"}):
        new = getattr(args, key)
        if key in ("data_root", "train_data") and new is not None:
            new = os.path.abspath(new)
        old = config.get(key)
        if old == new:
            continue
        check(key in RESUMABLE, f"--{key.replace('_', '-')} was {old!r} when {run} started and "
                                f"can't change on --resume (you gave {new!r}); repeat it or leave "
                                f"it out, or start a new run with another --out-dir")
        config[key], changed[key] = new, [old, new]
    if changed:
        config["resumes"] = [*config.get("resumes", []), {"changed": changed}]
    return config


# ----------------------------------------------------------------------------------------
# Which run: a new folder, or the checkpoint and folder to resume (nothing is written here)

def is_run(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def has_checkpoint(folder: Path) -> bool:
    return (folder / "checkpoints" / "last.pt").is_file()


def newest_idle_run() -> Path:
    runs = sorted((p for p in Path("runs").glob("*") if is_run(p)),
                  key=lambda p: (p / "config.json").stat().st_mtime, reverse=True)
    for run in runs:
        if not RunFolder.is_locked(run):
            return run
    raise UsageError("--resume found no run in runs/ that is not training; "
                     "pass --resume RUN_FOLDER or --out-dir")


def check_new_folder(folder: Path) -> None:
    check(not folder.exists() or folder.is_dir(), f"--out-dir {folder} is a file; name a folder")
    check(not has_checkpoint(folder),
          f"{folder} already holds a run; add --resume to continue it or choose another --out-dir")


def plan_run(args: argparse.Namespace, given: set[str]) -> tuple[dict, Path | None, dict | None, Path | None]:
    """(config, run folder, checkpoint to resume or None, the run a fork copies best.pt from).

    The folder is None for a new run in runs/<timestamp>-<arch> (named on rank 0 later).
    """
    check_flags(args)
    out = Path(args.out_dir).resolve() if args.out_dir else None
    if args.dry_run:
        args.epoch_size = None  # one global batch, set by resolve_config
    if args.resume is None:
        if out is not None:
            check_new_folder(out)
        return resolve_config(args), out, None, None
    if args.resume == "latest":
        source = out or newest_idle_run()
        if not is_run(source) and not has_checkpoint(source):
            # Killed before it wrote its config (or never started): the flags say it all.
            check_new_folder(source)
            return resolve_config(args), source, None, None
        ckpt = source / "checkpoints" / "last.pt"
    else:
        path = Path(args.resume).resolve()
        check(path.exists(), f"--resume {args.resume}: no such file or folder")
        ckpt = path / "checkpoints" / "last.pt" if path.is_dir() else path
        check(not path.is_dir() or is_run(path), f"--resume {args.resume}: not a run folder (no config.json)")
        source = ckpt.parent.parent if ckpt.parent.name == "checkpoints" and is_run(ckpt.parent.parent) else None
    in_place = out is None or out == source
    if in_place:
        check(source is not None, f"--resume {ckpt} is not inside a run folder; add --out-dir NEW "
                                  f"to continue it in a new run folder")
        check(ckpt.name == "last.pt", f"--resume {ckpt} would rewind {source} to an older state; "
                                      f"fork it instead with --out-dir NEW_FOLDER")
        check(not RunFolder.is_locked(source), f"{source} is being trained by another process")
    else:
        check_new_folder(out)
        check(ckpt.is_file(), f"--resume {ckpt}: no checkpoint to fork into {out}")
    if not ckpt.is_file():  # a run that failed before its first checkpoint starts again
        stored = json.loads((source / "config.json").read_text())
        return resumed_config(stored, args, given, source), source, None, None
    checkpoint = load_checkpoint(ckpt)
    check("optimizer" in checkpoint, f"{ckpt} holds no optimizer state (a converted or exported "
                                     f"model?); evaluate it with evaluate.py, or start a new run")
    config = resumed_config(checkpoint["config"], args, given, source or ckpt)
    if "history" not in checkpoint:  # written before checkpoints carried it
        lines = (source / "metrics.jsonl").read_text().splitlines() if source and \
            (source / "metrics.jsonl").is_file() else []
        checkpoint["history"] = [r for r in map(json.loads, filter(str.strip, lines))
                                 if r["epoch"] <= checkpoint["epoch"]]
    if not in_place:
        config["forked_from"] = str(ckpt)
    return config, source if in_place else out, checkpoint, None if in_place else source


# ----------------------------------------------------------------------------------------
# Set-up: the device, the process, the data, the folder; then the loop (train, below)

def main(argv=None) -> dict:
    args, given = parse_args(argv)
    config, run_dir, checkpoint, fork_source = plan_run(args, given)
    rank, world, device = init_distributed(config["device"])
    try:
        amp = config["precision"] = resolve_amp(config["amp"], device)
        check(config["conv"] == "direct" or amp == "none",
              f"--conv winograd runs in fp32 only, not under --amp {amp}; add --amp none")
        if config["workers"] is None:
            config["workers"] = min(8, (os.cpu_count() or 1) // world) if device.type == "cuda" else 1
        train_set, val_set = rank0_first(rank, make_datasets, config)
        B = config["batch_size"]
        check(len(train_set) >= B * world,
              f"an epoch of {len(train_set)} sequences gives no full batch of {B} x {world} "
              f"process(es); lower --batch-size or raise --epoch-size")
        if run_dir is None:
            run_dir = broadcast(new_run_dir(config["arch"]) if rank == 0 else None, rank)
        config["world_size"] = world
        # Process-wide speed settings for this device, chosen once: cudnn.benchmark on CUDA;
        # on CPUs channels_last and glibc keeping freed memory (docs/speed.md).
        memory_format = configure_process(device)
        return train(config, RunFolder(run_dir, rank == 0), checkpoint, fork_source, train_set,
                     val_set, rank, world, device, memory_format, amp)
    finally:
        if dist.is_initialized():
            # The DDP wrapper sits in reference cycles; free it while its process group
            # lives, or its threads die at interpreter exit.
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


def new_run_dir(arch: str) -> Path:
    base = Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{arch}"
    run_dir, n = base, 1
    while run_dir.exists():  # two runs in one second: never share a folder
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir.resolve()


# ----------------------------------------------------------------------------------------
# Data

def make_datasets(config: dict) -> tuple[Dataset, Dataset]:
    """Training and validation sets; every problem with the data is a UsageError here."""
    fi, fo = config["frames_input"], config["frames_output"]
    model = config["model"]
    if config["train_data"]:
        sequences = load_sequences(config["train_data"])  # (N, T, C, H, W)
        _, T, C, H, W = sequences.shape
        stride = math.prod(stage["down"]["stride"] for stage in model["stages"])
        check(C == model["frame_channels"], f"--train-data has {C} channels but the preset's frames "
                                            f"have {model['frame_channels']}")
        check(min(H, W) >= 7, f"--train-data frames are {H}x{W}; SSIM needs at least 7x7")
        check(H % stride == 0 and W % stride == 0,
              f"--train-data frames are {H}x{W}, but the preset's stages downsample by {stride}; "
              f"crop them to a multiple of {stride}")
        train_idx, val_idx = split_holdout(len(sequences), config["holdout_fraction"])
        return (SequenceArrayDataset(sequences, fi, fo, indices=train_idx),
                SequenceArrayDataset(sequences, fi, fo, indices=val_idx))
    root = Path(config["data_root"])
    check(not root.exists() or root.is_dir(),
          f"--data-root {root} is a file; name the folder that holds the MNIST files")
    common = dict(n_frames_input=fi, n_frames_output=fo, num_objects=config["num_digits"],
                  seed=config["seed"], image_size=model["image_size"],
                  download=not config["no_download"])
    train = MovingMNIST(config["data_root"], True, length=config["epoch_size"], **common)
    val = MovingMNIST(config["data_root"], False, length=config["val_size"], **common)
    return train, val


def epoch_order(dataset: Dataset, config: dict, epoch: int) -> list:
    """An epoch's samples in step order. A Moving MNIST sample is a function of (seed, epoch,
    index): the sampler yields (epoch, index), which persistent workers read too. A fixed
    array is shuffled by a generator keyed on (seed, epoch)."""
    if isinstance(dataset, MovingMNIST):
        return [(epoch, i) for i in range(len(dataset))]
    g = torch.Generator().manual_seed(config["seed"] * 1_000_003 + epoch)
    return torch.randperm(len(dataset), generator=g).tolist()


def rank_share(order: list, batch: int, rank: int, world: int) -> list:
    """This process's samples of `order`: step s covers positions s*B*world ... of it, and
    rank r takes the r-th slice of B. So N processes of batch B see exactly the sequences
    that one process of batch N*B sees."""
    steps = len(order) // (batch * world)
    return [order[s * batch * world + rank * batch + j] for s in range(steps) for j in range(batch)]


class EpochSampler:
    """The indices of the current epoch; one DataLoader (and its workers) serves all epochs."""

    def __init__(self):
        self.indices = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# ----------------------------------------------------------------------------------------
# Distributed: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; one process otherwise.

def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a no-op in one process). Handles nccl's need for device tensors."""
    if not dist.is_initialized():
        return t
    backend_device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    out = t.to(backend_device)
    dist.all_reduce(out)
    return out.to(t.device)


def rank0_first(rank: int, fn, *args):
    """fn on rank 0 first (it may download), then on the others. A UsageError or OSError
    on rank 0 reaches every rank, so that none waits for it forever."""
    if not dist.is_initialized():
        return fn(*args)
    result, error = None, None
    if rank == 0:
        try:
            result = fn(*args)
        except (UsageError, OSError) as e:
            error = e
    shared = [None if error is None else str(error)]
    dist.broadcast_object_list(shared, src=0)
    if error is not None:
        raise error
    if shared[0] is not None:
        raise UsageError(shared[0])
    return result if rank == 0 else fn(*args)


def broadcast(value, rank: int):
    """Rank 0's value on every rank."""
    if not dist.is_initialized():
        return value
    shared = [value if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


# ----------------------------------------------------------------------------------------
# The run folder

class RunFolder:
    """The run folder, and every write to it. Only rank 0 writes; other ranks' calls do nothing.

        config.json            every setting, the preset included
        events.out.tfevents.*  TensorBoard: losses, metrics, LR, pictures, HParams
        metrics.jsonl          one line per finished epoch
        checkpoints/last.pt    the latest state: an epoch's end, or mid-epoch after a stop
        checkpoints/best.pt    the state at the end of the best epoch (lowest val_loss)

    Crash consistency: checkpoints are written atomically, and each carries the history of
    finished epochs. `open` repairs whatever a kill left half-done: metrics.jsonl is
    rewritten from the history, best.pt made to match the history's best epoch, temp files
    removed. A lock (flock, dropped by the OS when the process dies) keeps a second process
    out of a folder that is training.
    """

    LOCK = ".lock"

    def __init__(self, path: Path, lead: bool):
        self.path, self.lead = Path(path), lead
        self.checkpoints = self.path / "checkpoints"
        self.writer, self._lock = None, None

    @classmethod
    def is_locked(cls, path: Path) -> bool:
        lock = cls._try_lock(Path(path) / cls.LOCK, create=False)
        if lock is False:
            return True
        if lock is not None:
            lock.close()
        return False

    @staticmethod
    def _try_lock(path: Path, create: bool = True):
        """An open, locked file; False if another process holds the lock; None where there
        is nothing to lock or no flock (Windows)."""
        try:
            import fcntl
        except ImportError:
            return None
        if not create and not path.exists():
            return None
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        return f

    @contextlib.contextmanager
    def opened(self, config: dict, state: dict | None, fork_source: Path | None = None):
        """The open folder for the duration of a `with` block (see `open`)."""
        self.open(config, state, fork_source)
        try:
            yield self
        finally:
            self.close()

    def open(self, config: dict, state: dict | None, fork_source: Path | None = None) -> None:
        """Lock the folder, write config.json, and bring metrics.jsonl, best.pt and
        TensorBoard in line with `state` (the checkpoint resumed from, or None)."""
        if not self.lead:
            return
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self._lock = self._try_lock(self.path / self.LOCK)
        check(self._lock is not False, f"{self.path} is being trained by another process")
        for tmp in [*self.path.glob(f".*{TMP_SUFFIX}"), *self.checkpoints.glob(f".*{TMP_SUFFIX}")]:
            tmp.unlink()  # a kill during an atomic write leaves its temp file
        if state is None:  # a new run, or one that failed before its first checkpoint
            for stale in [*self.path.glob("events.out.tfevents.*"), *self.checkpoints.glob("*.pt"),
                          self.path / "metrics.jsonl"]:
                stale.unlink(missing_ok=True)
        atomic_write_text(self.path / "config.json", json.dumps(config, indent=2) + "\n")
        history = [] if state is None else state["history"]
        self._write_metrics(history)
        if state is not None:
            self._repair_best(state, fork_source)
        from torch.utils.tensorboard import SummaryWriter  # slow to import: only where used
        # Events past the checkpoint are redone by this run; its own step's stay.
        self.writer = SummaryWriter(str(self.path), purge_step=None if state is None else state["step"] + 1)
        if state is None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
            self._log_hparams(config)

    def _write_metrics(self, history: list[dict]) -> None:
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def _repair_best(self, state: dict, fork_source: Path | None) -> None:
        """Make best.pt the state at the end of the history's best epoch, where one has it."""
        best = best_epoch(state["history"])
        target = self.checkpoints / "best.pt"
        candidates = [target] + ([fork_source / "checkpoints" / "best.pt"] if fork_source else [])
        for path in candidates:
            if path.is_file() and is_end_of(load_checkpoint(path), best):
                if path != target:
                    atomic_save(load_checkpoint(path), target)
                return
        if is_end_of(state, best):
            atomic_save(state, target)
        else:
            target.unlink(missing_ok=True)

    def _log_hparams(self, config: dict) -> None:
        """The run's settings for TensorBoard's HParams dashboard; its metrics are the
        val/* scalars logged every epoch."""
        from torch.utils.tensorboard.summary import hparams
        keys = ("arch", "batch_size", "lr", "optimizer", "weight_decay", "schedule", "warmup",
                "loss", "clip", "amp", "epochs", "epoch_size", "seed")
        settings = {k: config[k] if isinstance(config[k], (int, float, str, bool)) else str(config[k])
                    for k in keys}
        metrics = {f"val/{k}": 0.0 for k in ("loss", *METRIC_NAMES)}
        for summary in hparams(settings, metrics):
            self.writer.file_writer.add_summary(summary)

    def log(self, step: int, scalars: dict, picture=None) -> None:
        if not self.lead:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        if picture is not None:  # once an epoch: write the epoch's events out
            self.writer.add_image("val/input_truth_prediction", picture, step,
                                  dataformats="HW" if picture.ndim == 2 else "HWC")
            self.writer.flush()

    def save(self, state: dict, improved: bool = False) -> None:
        """last.pt, then best.pt, then metrics.jsonl: a kill between two of them is repaired
        by `open` from last.pt."""
        if not self.lead:
            return
        atomic_save(state, self.checkpoints / "last.pt")
        if improved:
            atomic_save(state, self.checkpoints / "best.pt")
        self._write_metrics(state["history"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._lock:
            self._lock.close()
        self.writer, self._lock = None, None


def best_epoch(history: list[dict]) -> int | None:
    """The finished epoch with the lowest val_loss (the first of equals), or None."""
    return min(history, key=lambda r: r["val_loss"])["epoch"] if history else None


def is_end_of(state: dict, epoch: int | None) -> bool:
    return epoch is not None and state.get("epoch") == epoch and not state.get("position", 0)


# ----------------------------------------------------------------------------------------
# Training state: what a checkpoint holds

class EarlyStopping:
    def __init__(self, patience: int):
        self.patience, self.best, self.bad_epochs = patience, math.inf, 0

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
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]


def lr_factor(schedule: str, warmup: float, step: int, total: int) -> float:
    """The LR as a share of the peak --lr after `step` optimizer steps of `total`."""
    progress = min(step / max(total, 1), 1.0)
    if schedule == "onecycle":  # Smith & Topin 2019: cosine up from peak/25, down to peak/25e4
        if progress < warmup:
            return 1 / 25 + (1 - 1 / 25) * (1 - math.cos(math.pi * progress / warmup)) / 2
        down = (progress - warmup) / (1 - warmup)
        return 1 / 25e4 + (1 - 1 / 25e4) * (1 + math.cos(math.pi * down)) / 2
    if progress < warmup:  # cosine: linear warm-up from 0, then a half cosine to 0
        return (step + 1) / (warmup * total + 1)
    return (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup))) / 2


class Trainer:
    """Model, optimizer, LR schedule, early stopping and the position in the run: the
    state a checkpoint holds, and the one optimisation step."""

    def __init__(self, config: dict, model: torch.nn.Module, steps_per_epoch: int,
                 device: torch.device, rank: int = 0, world: int = 1):
        self.config, self.model, self.device, self.rank, self.world = config, model, device, rank, world
        self.steps_per_epoch = steps_per_epoch
        decay = config["weight_decay"]
        opt = torch.optim.AdamW if config["optimizer"] == "adamw" else torch.optim.Adam
        self.optimizer = opt(model.parameters(), lr=config["lr"], weight_decay=decay)
        self.total_steps = config["epochs"] * steps_per_epoch
        if config["schedule"] == "plateau":  # factor 0.5 and patience 4, as in the original repo
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=0.5,
                                                                        patience=4)
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda s: lr_factor(config["schedule"], config["warmup"], s,
                                                    self.total_steps))
        self.stopper = EarlyStopping(config["patience"])
        self.scaler = torch.amp.GradScaler(device.type, enabled=config["amp"] == "fp16")
        self.epoch, self.position, self.step, self.history = 0, 0, 0, []
        self.loss_sum = torch.zeros((), device=device)  # this epoch's losses, summed on the device

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, model, inputs, targets, amp_ctx) -> None:
        self.loss_sum += train_step(model, self.optimizer, self.scaler, inputs, targets, amp_ctx,
                                    self.config["clip"], self.config["loss"])
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
        train_loss = sum(self.epoch_losses()) / (self.world * self.steps_per_epoch)
        improved = self.stopper.update(val_loss)
        if self.config["schedule"] == "plateau":
            self.scheduler.step(val_loss)
        self.history.append({"epoch": self.epoch + 1, "step": self.step, "train_loss": train_loss,
                             "val_loss": val_loss, **{k: metrics[k] for k in METRIC_NAMES},
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

    def load_state_dict(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as err:  # a checkpoint of another model or version
            raise UsageError(f"the checkpoint doesn't fit this version's {self.config['arch']} "
                             f"model ({str(err).splitlines()[0]}); evaluate it with evaluate.py, "
                             f"or start a new run") from None
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
            group["lr"] = lr if self.config["schedule"] == "plateau" else \
                lr * lr_factor(self.config["schedule"], self.config["warmup"], self.step, self.total_steps)
        if self.config["schedule"] != "plateau":
            self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)


# ----------------------------------------------------------------------------------------
# Stopping early: Ctrl-C, SIGTERM and the time budget

class StopRequest:
    """Ctrl-C or SIGTERM ask the loop to stop after the current step and save where it is;
    a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self._old = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM after saving; the message says how to resume."""


# ----------------------------------------------------------------------------------------
# Validation

def validate(model, loader, device, amp_ctx, frames_output: int) -> tuple[float, dict, tuple]:
    """Mean per-pixel MSE (the training loss) and the field's metrics on the fixed set.

    Under torchrun each process scores its shard and the sums are all-reduced, so the
    result equals one process scoring the whole set. Returns (val_loss, metrics, this
    process's first batch (inputs, targets, predictions)).
    """
    scores = score(model, loader, device, amp_ctx, frames_output)
    metrics = scores.metrics["model"]
    metrics.load_tensor(all_sum(metrics.as_tensor()))
    loss = all_sum(scores.loss_sums)
    return (loss[0] / loss[1]).item(), metrics.compute(), scores.first_batch


def check_finite(value: float, what: str, step: int, run: RunFolder, trainer: Trainer) -> None:
    if math.isfinite(value):
        return
    saved = (f"{run.checkpoints / 'last.pt'} holds epoch {trainer.epoch} (step {trainer.step - 1} "
             f"at most); resume with a lower --lr: python main.py --resume {run.path} --lr LR"
             if has_checkpoint(run.path) else
             f"nothing was saved, so the same command with a lower --lr starts {run.path} again")
    raise UsageError(f"{what} is {value} at step {step}; stopped without saving. {saved}. "
                     f"Or use --amp none / bf16 instead of fp16")


# ----------------------------------------------------------------------------------------
# The loop

def build(config: dict, device: torch.device, memory_format, world: int):
    """(the model, what runs it: compiled and/or wrapped in DDP as the config says)."""
    seed_everything(config["seed"])
    model = build_model(config["model"]).to(device, memory_format=memory_format)
    if config["conv"] == "winograd":
        from tools.winograd import use_winograd  # opt-in: tools/winograd.py, docs/speed.md
        use_winograd(model)
    runnable = torch.compile(model) if config["compile"] else model
    if world > 1:
        runnable = DDP(runnable, device_ids=[device] if device.type == "cuda" else None)
    return model, runnable


def make_loaders(train_set, val_set, config: dict, device: torch.device, rank: int, world: int):
    """(sampler, training loader, validation loader): one of each for the whole run, so
    workers can persist; the sampler holds the current epoch's indices."""
    sampler = EpochSampler()
    kw = dict(batch_size=config["batch_size"], num_workers=config["workers"],
              pin_memory=device.type == "cuda", persistent_workers=config["workers"] > 0)
    val_shard = Subset(val_set, range(rank, len(val_set), world))  # its sums are all-reduced
    return sampler, DataLoader(train_set, sampler=sampler, **kw), DataLoader(val_shard, **kw)


def train(config, run, state, fork_source, train_set, val_set, rank, world, device,
          memory_format, amp) -> dict:
    """Epochs of steps, validation and checkpoints, until the epochs, early stopping, the
    time budget or Ctrl-C end them. Only rank 0 writes files and draws progress bars."""
    log = tqdm.write if rank == 0 else (lambda *a, **k: None)
    model, runnable = build(config, device, memory_format, world)
    B = config["batch_size"]
    trainer = Trainer(config, model, len(train_set) // (B * world), device, rank, world)
    if state is not None:
        trainer.load_state_dict(state)
        if state["config"]["lr"] != config["lr"]:  # a new --lr on resume
            trainer.set_peak_lr(config["lr"])
    sampler, train_loader, val_loader = make_loaders(train_set, val_set, config, device, rank, world)
    amp_ctx = autocast_context(device, amp)
    log(f"run {run.path}: {config['arch']} ({count_parameters(model):,} parameters) on {world} x "
        f"{device}, batch {B}{' per process' if world > 1 else ''}, lr {config['lr']:g} "
        f"({config['schedule']}), amp {amp}" + (f", resuming at epoch {trainer.epoch + 1}, "
                                                 f"step {trainer.step}" if state else ""))
    deadline = None if config["time_budget"] is None else time.time() + 60 * config["time_budget"]
    first_epoch = trainer.epoch
    with run.opened(config, state, fork_source), StopRequest() as stop:
        while trainer.epoch < config["epochs"]:
            if trainer.epoch > first_epoch and deadline is not None and agree(time.time() > deadline):
                log(f"time budget of {config['time_budget']:g} min reached after epoch {trainer.epoch}")
                break
            t0 = time.time()
            order = epoch_order(train_set, config, trainer.epoch)
            sampler.indices = rank_share(order[trainer.position:], B, rank, world)
            why = train_epoch(trainer, runnable, train_loader, amp_ctx, run, stop, deadline)
            if why:
                run.save(trainer.state_dict())
                message = (f"stopped by {why} at epoch {trainer.epoch + 1}, step {trainer.step}; "
                           f"saved {run.checkpoints / 'last.pt'}; continue with the same command "
                           f"and --resume, or: python main.py --resume {run.path}")
                if why != "the time budget":
                    raise Interrupted(message)
                log(message)
                break
            val_loss, metrics, first = validate(runnable, val_loader, device, amp_ctx,
                                                config["frames_output"])
            check_finite(val_loss, "the validation loss", trainer.step, run, trainer)
            improved = trainer.end_epoch(val_loss, metrics, time.time() - t0)
            run.save(trainer.state_dict(), improved)
            result = trainer.history[-1]
            run.log(trainer.step, {"train/epoch_loss": result["train_loss"], "val/loss": val_loss,
                                   **{f"val/{k}": metrics[k] for k in METRIC_NAMES}, "lr": trainer.lr},
                    prediction_grid(*first) if rank == 0 else None)
            log(f"epoch {result['epoch']}/{config['epochs']}  train {result['train_loss']:.5f}  "
                f"val {val_loss:.5f}  mse {metrics['mse']:.1f}  ssim {metrics['ssim']:.4f}  "
                f"lr {trainer.lr:.2g}  {result['seconds']:.0f}s{'  *best' if improved else ''}")
            if trainer.stopper.should_stop:
                log(f"early stopping: no better val loss for {trainer.stopper.patience} epochs")
                break
    return trainer.history[-1] if trainer.history else {}


def agree(*flags: bool):
    """Each flag is true on every process if it is true on any (a no-op in one process)."""
    total = all_sum(torch.tensor([float(f) for f in flags], dtype=torch.float64))
    result = [bool(v > 0) for v in total.tolist()]
    return result[0] if len(result) == 1 else result


def train_epoch(trainer: Trainer, model, loader, amp_ctx, run: RunFolder, stop: StopRequest,
                deadline: float | None) -> str | None:
    """Train the rest of the current epoch. Returns why it stopped early, or None at its end.

    The device syncs only every --log-every steps (and at the epoch's last step): then the
    loss is logged, and all processes agree whether to stop (budget or signal), so that
    they stop at the same step.
    """
    config, B, world = trainer.config, trainer.config["batch_size"], trainer.world
    device, log_every = trainer.device, config["log_every"]
    steps = len(loader)
    logged = (trainer.step, sum(trainer.epoch_losses()))
    t0 = time.time()
    bar = tqdm(loader, desc=f"epoch {trainer.epoch + 1}", leave=False, dynamic_ncols=True,
               disable=trainer.rank != 0)
    for k, (inputs, targets) in enumerate(bar, start=1):
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        trainer.train_step(model, inputs, targets, amp_ctx)
        trainer.position += B * world
        if k % log_every and k != steps and not (world == 1 and stop.signal):
            continue
        late, signalled = agree(deadline is not None and time.time() > deadline,
                                stop.signal is not None)
        total = sum(trainer.epoch_losses())
        window = (total - logged[1]) / (world * (trainer.step - logged[0]))
        check_finite(window, "the training loss", trainer.step, run, trainer)
        run.log(trainer.step, {"train/loss": window, "train/lr": trainer.lr})
        bar.set_postfix(loss=f"{window:.5f}", seq_s=f"{k * B * world / (time.time() - t0):.1f}")
        logged = (trainer.step, total)
        if signalled or (late and k != steps):
            bar.close()
            return (stop.signal or "a signal") if signalled else "the time budget"
    bar.close()
    return None


if __name__ == "__main__":
    sys.exit(run_cli(main))
