"""The run folder: where a run writes, which run a --resume continues, and every write to the folder.

`locate_run` turns --resume and --out-dir into a folder and a checkpoint, writing nothing;
`RunFolder` then owns the folder while main.py trains in it (its docstring lists the files).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from checkpoints import TMP_SUFFIX, atomic_save, atomic_write_text, load_checkpoint, write_json
from metrics import METRIC_NAMES
from utils import UsageError, check

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


def new_run_dir(arch: str) -> Path:
    base = Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{arch}"
    run_dir, n = base, 1
    while run_dir.exists():  # two runs in one second: never share a folder
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir.resolve()


@dataclass
class Location:
    """Where a run writes, and what it resumes."""
    folder: Path | None      # the run folder; None: a new runs/<timestamp>-<arch>, named later
    checkpoint: Path | None  # the checkpoint to resume; None: a new run
    source: Path | None      # the run folder that holds `checkpoint`, if any

    @property
    def in_place(self) -> bool:
        """The run goes on in its own folder (else it forks into a new one)."""
        return self.folder == self.source


def locate_run(resume: str | None, out_dir: str | None) -> Location:
    """--resume (None, "latest" or a path) and --out-dir -> the run's Location.

    A checkpoint that is not a file yet means a run that failed before its first one.
    Raises UsageError for a folder that is taken, training, or would be rewound.
    """
    out = Path(out_dir).resolve() if out_dir else None
    if resume is None:
        if out is not None:
            check_new_folder(out)
        return Location(out, None, None)
    if resume == "latest":
        source = out or newest_idle_run()
        if not is_run(source) and not has_checkpoint(source):
            # Killed before it wrote its config (or never started): the flags say it all.
            check_new_folder(source)
            return Location(source, None, None)
        ckpt = source / "checkpoints" / "last.pt"
    else:
        path = Path(resume).resolve()
        check(path.exists(), f"--resume {resume}: no such file or folder")
        ckpt = path / "checkpoints" / "last.pt" if path.is_dir() else path
        check(not path.is_dir() or is_run(path), f"--resume {resume}: not a run folder (no config.json)")
        source = ckpt.parent.parent if ckpt.parent.name == "checkpoints" and is_run(ckpt.parent.parent) else None
    if out is None or out == source:
        check(source is not None, f"--resume {ckpt} is not inside a run folder; add --out-dir NEW "
                                  f"to continue it in a new run folder")
        check(ckpt.name == "last.pt", f"--resume {ckpt} would rewind {source} to an older state; "
                                      f"fork it instead with --out-dir NEW_FOLDER")
        check(not RunFolder.is_locked(source), f"{source} is being trained by another process")
        return Location(source, ckpt, source)
    check_new_folder(out)
    check(ckpt.is_file(), f"--resume {ckpt}: no checkpoint to fork into {out}")
    return Location(out, ckpt, source)


def recorded_history(folder: Path | None, epoch: int) -> list[dict]:
    """The epochs up to `epoch` from a folder's metrics.jsonl, for checkpoints written
    before they carried their history."""
    path = None if folder is None else folder / "metrics.jsonl"
    lines = path.read_text().splitlines() if path is not None and path.is_file() else []
    return [r for r in map(json.loads, filter(str.strip, lines)) if r["epoch"] <= epoch]


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
        write_json(self.path / "config.json", config)
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
                "loss", "clip", "precision", "epochs", "epoch_size", "seed")
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
