"""Train an encoder-forecaster on Moving MNIST (or your own sequences).

    python main.py                                   # convlstm, the original's setting
    python main.py --arch tiny --device cpu --time-budget 15 --data-root ../shared/data/mnist
    python main.py --resume --out-dir runs/2026...   # continue a run exactly

A run is a folder (default runs/<timestamp>-<arch>) holding config.json, TensorBoard
events, metrics.jsonl (one line per epoch) and checkpoints/{last,best}.pt.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from data.mm import MovingMNIST, SequenceArrayDataset, load_sequences, split_holdout
from model import build_model, count_parameters
from net_params import get_preset
from utils import (MetricAccumulator, atomic_save, keep_freed_memory, load_checkpoint,
                   pick_device, prediction_grid, rng_state, seed_everything, set_rng_state)
from winograd import ALGORITHMS, resolve_conv_algorithm, set_conv_algorithm

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
METRICS = ("mse", "mae", "ssim", "psnr")
# Flags that may change when a run is resumed; everything else comes from its config.json.
RESUMABLE = ("epochs", "time_budget", "device", "workers", "compile", "conv", "log_every",
             "patience")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a ConvLSTM/ConvGRU encoder-forecaster.")
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
    p.add_argument("--epochs", type=int, default=500, metavar="N", help="(default: 500)")
    p.add_argument("--epoch-size", type=int, default=None, metavar="N",
                   help="sequences per epoch (default: the preset's, 10000 for convlstm)")
    p.add_argument("--val-size", type=int, default=1000, metavar="N",
                   help="fixed validation sequences from held-out digits (default: 1000)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="sequences per step (default: the preset's, 16 for convlstm)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default: the preset's, 1e-4 for convlstm)")
    p.add_argument("--clip", type=float, default=10.0, help="gradient-norm clip (default: 10)")
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
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="DataLoader worker processes (default: 2)")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="autocast precision; fp16 on CUDA only (default: none)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    p.add_argument("--conv", default="auto", choices=ALGORITHMS,
                   help="the cells' convolution algorithm: winograd (F(4x4, k x k), fewer "
                        "multiplies) or direct; auto = winograd for fp32 on the CPU, direct "
                        "elsewhere (default: auto)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="end training after this many minutes, then validate and "
                        "checkpoint (default: none)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from a checkpoint or run folder; with no PATH, "
                        "--out-dir's (or the newest run's) last checkpoint (default: off)")
    p.add_argument("--log-every", type=int, default=20, metavar="N",
                   help="steps between loss logs; each log syncs the device (default: 20)")
    p.add_argument("--dry-run", action="store_true",
                   help="one epoch of one batch, a smoke test (default: off)")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, set[str]]:
    """The flags, and the names of those given explicitly (resume keeps the rest)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
    return args, given


# ----------------------------------------------------------------------------------------
# One step, and the precision it runs in (bench.py times exactly this).

def autocast_context(device: torch.device, amp: str):
    """torch.autocast for --amp bf16|fp16, a no-op for none."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown --amp {amp!r}; use none, bf16 or fp16")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"--amp fp16 needs a CUDA device, got {device.type}; use --amp bf16")
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, inputs, targets,
               amp_ctx, clip: float = 10.0) -> torch.Tensor:
    """One optimisation step on a batch (B, T_in, C, H, W) -> (B, T_out, C, H, W).

    Returns the loss as a detached tensor: the caller decides when to sync with .item().
    """
    with amp_ctx:
        pred = model(inputs, frames_output=targets.shape[1])
    loss = F.mse_loss(pred.float(), targets)  # the mean over pixels: no second division by B
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


# ----------------------------------------------------------------------------------------
# Run folder, config, data

def resolve_config(args: argparse.Namespace) -> dict:
    """Flags plus the preset's defaults -> the run's full config (saved as config.json)."""
    preset = get_preset(args.arch)
    if args.frames_input is not None:
        preset.frames_input = args.frames_input
    if args.frames_output is not None:
        preset.frames_output = args.frames_output
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "dry_run")}
    for key in ("batch_size", "lr", "epoch_size"):  # flags override the preset's defaults
        if config[key] is None:
            config[key] = getattr(preset, key)
    config["frames_input"], config["frames_output"] = preset.frames_input, preset.frames_output
    config["model"] = preset.to_dict()
    if args.dry_run:
        config.update(epochs=1, epoch_size=config["batch_size"],
                      val_size=min(config["val_size"], config["batch_size"]))
    return config


def new_run_dir(out_dir: str | None, arch: str) -> Path:
    if out_dir is None:
        base = Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{arch}"
        run_dir, n = base, 1
        while run_dir.exists():  # two runs in one second: never share a folder
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")
    else:
        run_dir = Path(out_dir)
        if (run_dir / "config.json").exists() or (run_dir / "checkpoints").exists():
            raise SystemExit(f"error: {run_dir} already holds a run; pass --resume to continue "
                             f"it or choose another --out-dir")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def find_resume_checkpoint(resume: str, out_dir: str | None) -> Path:
    if resume == "latest":
        if out_dir is not None:
            path = Path(out_dir)
        else:
            runs = sorted(Path("runs").glob("*/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime)
            if not runs:
                raise SystemExit("error: --resume found no runs/*/checkpoints/last.pt; "
                                 "pass --resume PATH or --out-dir")
            path = runs[-1]
    else:
        path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.exists():
        raise SystemExit(f"error: no checkpoint at {path}; pass --resume PATH to a .pt file "
                         f"or a run folder")
    return path


def make_datasets(config: dict) -> tuple[Dataset, Dataset]:
    fi, fo = config["frames_input"], config["frames_output"]
    if config["train_data"]:
        sequences = load_sequences(config["train_data"])  # (N, T, C, H, W)
        train_idx, val_idx = split_holdout(len(sequences), config["holdout_fraction"])
        return (SequenceArrayDataset(sequences, fi, fo, indices=train_idx),
                SequenceArrayDataset(sequences, fi, fo, indices=val_idx))
    common = dict(n_frames_input=fi, n_frames_output=fo, num_objects=config["num_digits"],
                  seed=config["seed"], image_size=config["model"]["image_size"],
                  download=not config["no_download"])
    train = MovingMNIST(config["data_root"], True, length=config["epoch_size"], **common)
    val = MovingMNIST(config["data_root"], False, length=config["val_size"], **common)
    return train, val


def epoch_indices(dataset: Dataset, config: dict, epoch: int, rank: int, world: int) -> list[int]:
    """This process's sample indices for one epoch, in step order.

    Step s of the global batch (batch_size * world sequences) covers positions
    s*B*world ... (s+1)*B*world - 1 of the epoch's order; rank r takes the r-th slice of
    B. A Moving MNIST sample is a function of (seed, epoch, index), so every rank draws
    different sequences, and N processes of batch B see exactly the sequences that one
    process of batch N*B sees. A fixed array is shuffled by a generator keyed on
    (seed, epoch), the same on every rank, so resume is exact too.
    """
    if isinstance(dataset, MovingMNIST):
        dataset.set_epoch(epoch)  # reaches the workers: they are re-created every epoch
        order = list(range(len(dataset)))
    else:
        g = torch.Generator().manual_seed(config["seed"] * 1_000_003 + epoch)
        order = torch.randperm(len(dataset), generator=g).tolist()
    B = config["batch_size"]
    steps = len(order) // (B * world)
    return [order[s * B * world + rank * B + j] for s in range(steps) for j in range(B)]


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


def on_rank0(rank: int, fn, *args):
    """Run fn on rank 0 and share its result, or its SystemExit, with every rank."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn(*args)
        except SystemExit as e:
            error = str(e)
    if dist.is_initialized():
        shared = [result, error]
        dist.broadcast_object_list(shared, src=0)
        result, error = shared
    if error:
        raise SystemExit(error)
    return result


# ----------------------------------------------------------------------------------------
# Validation, early stopping

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


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, device, amp_ctx, frames_output: int):
    """Mean per-pixel MSE (the training loss) and the field's metrics on a fixed set.

    Under torchrun each process scores its shard and the sums are all-reduced, so the
    result equals one process scoring the whole set.
    Returns (val_loss, metrics dict, this process's first batch (inputs, targets, preds)).
    """
    model.eval()
    metrics = MetricAccumulator(frames_output)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (squared error, pixels)
    first = None
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        with amp_ctx:
            pred = model(inputs, frames_output=frames_output)
        pred = pred.float()
        sums[0] += F.mse_loss(pred, targets, reduction="sum").double()
        sums[1] += targets.numel()
        metrics.update(pred, targets)
        if first is None:
            first = (inputs.cpu(), targets.cpu(), pred.cpu())
    model.train()
    sums = all_sum(sums)
    metrics.load_tensor(all_sum(metrics.as_tensor()))
    return (sums[0] / sums[1]).item(), metrics.compute(), first


def append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop lines written after the checkpoint we resume from (a crash between the two)."""
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    kept = [l for l in lines if json.loads(l)["epoch"] <= epochs_done]
    if len(kept) != len(lines):
        atomic_write(path, "".join(l + "\n" for l in kept))


# ----------------------------------------------------------------------------------------

def load_run(args, given: set[str]) -> tuple[dict, dict | None, str | None]:
    """(config, checkpoint or None, run folder or None) from the flags."""
    if not args.resume:
        return resolve_config(args), None, args.out_dir
    path = find_resume_checkpoint(args.resume, args.out_dir)
    checkpoint = load_checkpoint(path)
    config = checkpoint["config"]
    fixed = sorted(given - set(RESUMABLE) - {"resume", "out_dir"})
    if fixed:
        raise SystemExit(f"error: --{fixed[0].replace('_', '-')} can't change on --resume "
                         f"(the run's config.json fixes it); start a new run instead")
    config.update({k: getattr(args, k) for k in RESUMABLE if k in given})
    return config, checkpoint, str(path.parent.parent)


def main(argv=None) -> dict:
    args, given = parse_args(argv)
    config, checkpoint, run_dir = load_run(args, given)
    rank, world, device = init_distributed(config["device"])
    try:
        return train(config, checkpoint, run_dir, rank, world, device)
    finally:
        if dist.is_initialized():
            # The DDP wrapper sits in reference cycles (the training loop's closures); free
            # it while its process group lives, or its threads die at interpreter exit
            # ("terminate called without an active exception").
            gc.collect()
            dist.barrier()  # no process leaves while another still talks to it
            dist.destroy_process_group()


def train(config: dict, checkpoint: dict | None, run_dir: str | None, rank: int, world: int,
          device: torch.device) -> dict:
    """The training loop. Only rank 0 writes files and draws progress bars."""
    lead = rank == 0
    log = tqdm.write if lead else (lambda *a, **k: None)

    seed_everything(config["seed"])
    raw_model = build_model(config["model"]).to(device)
    if device.type == "cpu":
        # Measured by bench.py on CPU: channels_last convolutions are 2-3% faster end to
        # end, and keeping freed memory saves re-faulting the activations every step (4-8%).
        raw_model.to(memory_format=torch.channels_last)
        keep_freed_memory()
    conv = resolve_conv_algorithm(config.get("conv", "auto"), device, config["amp"])
    set_conv_algorithm(raw_model, conv)
    log(f"cell convolutions: {conv}")
    model = torch.compile(raw_model) if config["compile"] else raw_model
    eval_model = model  # validation runs per shard, outside DDP's gradient hooks
    if world > 1:
        model = DDP(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=config["lr"])
    # factor 0.5 and patience 4, as in the original repo
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=4)
    stopper = EarlyStopping(config["patience"])
    scaler = torch.amp.GradScaler(device.type, enabled=config["amp"] == "fp16")
    amp_ctx = autocast_context(device, config["amp"])
    start_epoch, step = 0, 0
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        stopper.load_state_dict(checkpoint["early_stopping"])
        stopper.patience = config["patience"]
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]

    if world > 1 and not lead:
        dist.barrier()  # rank 0 downloads missing data first, alone
    train_set, val_set = make_datasets(config)
    if world > 1 and lead:
        dist.barrier()
    # The folder comes last, so a bad preset or missing data leaves no empty run behind.
    if checkpoint is None:
        run_dir = on_rank0(rank, lambda: str(new_run_dir(run_dir, config["arch"])))
    run_dir = Path(run_dir)
    config["world_size"] = world
    if lead:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
    if checkpoint is not None:
        if lead:
            truncate_metrics(run_dir / "metrics.jsonl", start_epoch)
        log(f"resuming {run_dir} at epoch {start_epoch}, step {step}")
    bs, fo = config["batch_size"], config["frames_output"]
    loader_kw = dict(batch_size=bs, num_workers=config["workers"],
                     pin_memory=device.type == "cuda")
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world)), **loader_kw)

    writer = None
    if lead:
        from torch.utils.tensorboard import SummaryWriter  # slow to import: only where used
        writer = SummaryWriter(str(run_dir), purge_step=step if checkpoint is not None else None)
        if checkpoint is None:
            writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
    log(f"run {run_dir}: {config['arch']} ({count_parameters(raw_model):,} parameters) on "
        f"{world} x {device}, batch {bs}{f' per process, {bs * world} in all' if world > 1 else ''}, "
        f"lr {config['lr']:g}, amp {config['amp']}")

    def save(name: str, epoch: int) -> None:
        atomic_save({
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "early_stopping": stopper.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "rng": rng_state(),
            "config": config,
        }, run_dir / "checkpoints" / name)

    budget_s = None if config["time_budget"] is None else 60 * config["time_budget"]
    trained_s, result, log_every = 0.0, {}, max(1, config["log_every"])
    epochs = tqdm(range(start_epoch, config["epochs"]), desc="epochs", initial=start_epoch,
                  total=config["epochs"], dynamic_ncols=True, disable=not lead)
    for epoch in epochs:
        t0 = time.time()
        indices = epoch_indices(train_set, config, epoch, rank, world)
        if not indices:
            raise SystemExit(f"error: an epoch of {len(train_set)} sequences gives no full "
                             f"batch of {bs} x {world} processes; lower --batch-size or raise "
                             f"--epoch-size")
        loader = DataLoader(train_set, sampler=indices, **loader_kw)
        loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
        logged, steps, out_of_time = torch.zeros(2, dtype=torch.float64), 0, False
        bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
                   disable=not lead)
        for inputs, targets in bar:
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            loss = train_step(model, optimizer, scaler, inputs, targets, amp_ctx, config["clip"])
            loss_sum += loss
            step, steps = step + 1, steps + 1
            if steps % log_every == 0 or steps == len(loader):
                # One sync per log: the loss summed over processes, and whether any is out
                # of time, so that every process stops at the same step.
                late = budget_s is not None and trained_s + time.time() - t0 > budget_s
                now = all_sum(torch.stack([loss_sum.double().cpu(), torch.tensor(float(late), dtype=torch.float64)]))
                window = (now[0] - logged[0]).item() / (world * (steps - logged[1].item()))
                check_finite(window, step, run_dir)
                if lead:
                    writer.add_scalar("train/loss", window, step)
                    bar.set_postfix(loss=f"{window:.5f}",
                                    seq_s=f"{steps * bs * world / (time.time() - t0):.1f}")
                logged = torch.tensor([now[0].item(), steps], dtype=torch.float64)
                if now[1] > 0:
                    out_of_time = True
                    break
        bar.close()
        train_loss = logged[0].item() / (world * logged[1].item())
        trained_s += time.time() - t0

        val_loss, metrics, (v_in, v_tgt, v_pred) = validate(eval_model, val_loader, device,
                                                            amp_ctx, fo)
        check_finite(val_loss, step, run_dir, what="validation loss")
        improved = stopper.update(val_loss)
        scheduler.step(val_loss)
        lr = optimizer.param_groups[0]["lr"]
        seconds = time.time() - t0
        result = {"epoch": epoch + 1, "step": step, "train_loss": train_loss,
                  "val_loss": val_loss, **{k: metrics[k] for k in METRICS},
                  "lr": lr, "seconds": round(seconds, 2)}
        if lead:
            writer.add_scalar("train/epoch_loss", train_loss, step)
            writer.add_scalar("val/loss", val_loss, step)
            for k in METRICS:
                writer.add_scalar(f"val/{k}", metrics[k], step)
            writer.add_scalar("lr", lr, step)
            writer.add_image("val/input_truth_prediction", prediction_grid(v_in, v_tgt, v_pred),
                             step, dataformats="HW" if v_in.shape[2] == 1 else "HWC")
            writer.flush()
            # Checkpoints first, then the metrics line: resume drops lines past its checkpoint.
            save("last.pt", epoch + 1)
            if improved:
                save("best.pt", epoch + 1)
            append_metrics(run_dir / "metrics.jsonl", result)
        log(f"epoch {epoch + 1}/{config['epochs']}  train {train_loss:.5f}  val {val_loss:.5f}  "
            f"mse {metrics['mse']:.1f}  mae {metrics['mae']:.1f}  ssim {metrics['ssim']:.4f}  "
            f"psnr {metrics['psnr']:.2f}  lr {lr:.2g}  {seconds:.0f}s"
            f"{'  *best' if improved else ''}")
        if stopper.should_stop:
            log(f"early stopping: no better val loss for {stopper.patience} epochs")
            break
        if out_of_time:
            log(f"time budget of {config['time_budget']:g} min reached")
            break
    epochs.close()
    if lead:
        writer.close()
    return result


def check_finite(value: float, step: int, run_dir: Path, what: str = "training loss") -> None:
    if not math.isfinite(value):
        raise SystemExit(
            f"error: {what} is {value} at step {step}; stopped without saving, so "
            f"{run_dir / 'checkpoints' / 'last.pt'} still holds the last good epoch. "
            f"Lower --lr, or use --amp none / bf16 instead of fp16, then --resume")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:  # bad presets, data files, flags: the message says the fix
        sys.exit(f"error: {e}")
