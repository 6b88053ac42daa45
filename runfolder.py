"""The run folder: where a run writes, which run a --resume continues, and every write to the folder.

`locate_run` turns --resume and --out-dir into a folder and a checkpoint, writing nothing;
`RunFolder` then owns the folder while main.py trains in it (its docstring lists the files).

Nothing that is not provably the run's is ever deleted: a folder that holds anything else
is refused before the run starts, and the only clean-up, of a run that stopped before its
first checkpoint, removes what its own config.json lists under "files".
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatch
from pathlib import Path

from checkpoints import (TMP_SUFFIX, WriteError, atomic_save, atomic_write_text, json_safe,
                         load_checkpoint, write_json)
from metrics import METRIC_NAMES
from utils import UsageError, check, first_line, warn

METRICS = "metrics.jsonl"
# config.json's "files": what a run writes besides config.json and its checkpoints, as
# glob patterns; the events file's name ends in a token of the run's own.
OWN_FILE = re.compile(r"metrics\.jsonl|events\.out\.tfevents\.\*\.[0-9a-f]{8,32}")

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


def is_temp(name: str) -> bool:
    """A temp file of atomic_write (".NAME.PID.HEX.tmp"), which a kill can leave behind."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def read_config(folder: Path) -> dict:
    """folder/config.json as a dict, or one UsageError line saying it is not a run's."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UsageError(f"{path} is not a run's config ({first_line(err)[:120]}), so {folder} is "
                         f"no run main.py can continue; choose another --out-dir") from None
    check(isinstance(config, dict), f"{path} holds a JSON {type(config).__name__}, not a run's "
                                    f"config, so {folder} is no run main.py can continue; choose "
                                    f"another --out-dir")
    return config


def own_files(config: dict | None) -> list[str]:
    """The patterns under a config's "files" that name what main.py writes (others are ignored)."""
    files = (config or {}).get("files")
    return [p for p in files if isinstance(p, str) and OWN_FILE.fullmatch(p)] if isinstance(files, list) else []


def foreign_files(folder: Path, config: dict | None) -> list[str]:
    """What in `folder` is not provably a run's that has no checkpoint yet: anything but
    its lock, config.json, temp files, an empty checkpoints/ and the files its config lists."""
    own = own_files(config)
    foreign = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name in (RunFolder.LOCK, "config.json") or is_temp(name) or any(fnmatch(name, p) for p in own):
            continue
        if name == "checkpoints" and entry.is_dir() and all(is_temp(p.name) for p in entry.iterdir()):
            continue
        foreign.append(name + "/" * entry.is_dir())
    return foreign


def check_startable(folder: Path) -> dict | None:
    """Raise UsageError unless a run may start from nothing in `folder`: one that doesn't
    exist, is empty, holds what a run killed before writing its config leaves, or holds a
    run that stopped before its first checkpoint (its config.json is returned; else None).

    Anything else is refused, so that nothing of the user's is overwritten or deleted.
    """
    if not folder.exists():
        return None
    check(folder.is_dir(), f"--out-dir {folder} is a file; name a folder")
    checkpoints = folder / "checkpoints"
    check(not checkpoints.exists() or checkpoints.is_dir(),
          f"{checkpoints} is a file, where a run keeps its checkpoints; move it or choose another "
          f"--out-dir")
    check(not has_checkpoint(folder),
          f"{folder} already holds a run; add --resume to continue it or choose another --out-dir")
    best = checkpoints / "best.pt"
    check(not best.is_file(), f"{folder} has no checkpoints/last.pt (deleted, or not copied?) but "
                              f"holds best.pt; continue from it in a new folder: python main.py "
                              f"--resume {best} --out-dir NEW_FOLDER")
    config = read_config(folder) if is_run(folder) else None
    if config is not None:
        metrics = folder / METRICS
        done = [line for line in metrics.read_text(errors="replace").splitlines() if line.strip()] \
            if metrics.is_file() else []
        check(not done, f"{metrics} records {len(done)} finished epoch(s), but {folder} has no "
                        f"checkpoints/last.pt to continue from (deleted, or not copied?); start a "
                        f"new run with another --out-dir")
    foreign = foreign_files(folder, config)
    shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
    check(not foreign, (f"{folder} holds files its run didn't write ({shown}); main.py never "
                        f"deletes those: move them, or choose another --out-dir") if config is not None
          else (f"{folder} is not empty and not a run folder (it holds {shown}); choose a new or "
                f"empty --out-dir"))
    return config


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
    restart: dict | None = None  # the config of a run resumed before its first checkpoint

    @property
    def in_place(self) -> bool:
        """The run goes on in its own folder (else it forks into a new one)."""
        return self.folder == self.source


def locate_run(resume: str | None, out_dir: str | None) -> Location:
    """--resume (None, "latest" or a path) and --out-dir -> the run's Location.

    A run without checkpoints/last.pt is resumed by starting it again, only where it
    stopped before its first checkpoint. Raises UsageError for a folder that is taken,
    training, missing, not a run's, or would be rewound.
    """
    out = Path(out_dir).resolve() if out_dir else None
    if resume is None:
        if out is not None:
            check_startable(out)
        return Location(out, None, None)
    if resume == "latest":
        if out is not None and not out.exists():  # a relative --out-dir, from another folder?
            relative = "" if Path(out_dir).is_absolute() else f" (--out-dir {out_dir} is relative to {Path.cwd()})"
            raise UsageError(f"--resume: there is no run at {out}{relative}; run from the folder "
                             f"the run started in, or give its full path")
        source = out or newest_idle_run()
        if not is_run(source) and not has_checkpoint(source):
            # Killed before it wrote its config: the flags say it all.
            check_startable(source)
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
        if not ckpt.is_file():  # stopped before its first checkpoint: it starts again
            return Location(source, None, source, check_startable(source))
        return Location(source, ckpt, source)
    check_startable(out)
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
        self.writer, self._lock, self._excepthook = None, None, None

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
        is nothing to lock or no flock (Windows, or a file system without it: then, with
        `create`, a warning says so)."""
        try:
            import fcntl
        except ImportError:
            return None
        if not create and not path.exists():
            return None
        try:
            f = open(path, "a" if create else "r")
        except OSError:
            if create:
                raise
            return None  # can't even read it: no process of ours holds it
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            f.close()
            if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return False
            if create:  # ENOLCK, EOPNOTSUPP, ...: Lustre without -o flock, NFS without lockd
                warn(f"can't lock {path} ({err.strerror}): this file system has no working flock, "
                     f"so make sure no other process trains in {path.parent}")
            return None
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
        TensorBoard in line with `state` (the checkpoint resumed from, or None).

        Where there is no last.pt yet (a new run, a fork, or a run that stopped before its
        first checkpoint), the files the old config.json lists are removed, and
        config["files"] lists this run's before any of them is written.
        """
        if not self.lead:
            return
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self._lock = self._try_lock(self.path / self.LOCK)
        check(self._lock is not False, f"{self.path} is being trained by another process")
        for tmp in [*self.path.glob(f".*{TMP_SUFFIX}"), *self.checkpoints.glob(f".*{TMP_SUFFIX}")]:
            tmp.unlink()  # a kill during an atomic write leaves its temp file
        token = uuid.uuid4().hex[:8]
        if not has_checkpoint(self.path):
            stored = None
            with contextlib.suppress(UsageError):  # locate_run refused a foreign config.json
                stored = read_config(self.path) if is_run(self.path) else None
            for pattern in own_files(stored):
                for stale in self.path.glob(pattern):
                    if stale.is_file():
                        stale.unlink()
            config["files"] = [METRICS, f"events.out.tfevents.*.{token}"]
        write_json(self.path / "config.json", config)
        history = [] if state is None else state["history"]
        self._write_metrics(history)
        if state is not None:
            self._repair_best(state, fork_source)
        from torch.utils.tensorboard import SummaryWriter  # slow to import: only where used
        # A full disk surfaces in TensorBoard's writer thread, then in log(): one warning there.
        self._excepthook = threading.excepthook
        threading.excepthook = self._quiet_event_thread
        # Events past the checkpoint are redone by this run; its own step's stay.
        self.writer = SummaryWriter(str(self.path), purge_step=None if state is None else state["step"] + 1,
                                    filename_suffix=f".{token}")
        if state is None:
            self._events(lambda w: w.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```"))
            self._events(self._log_hparams(config))

    def _quiet_event_thread(self, args) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            self._excepthook(args)

    def _write_metrics(self, history: list[dict]) -> None:
        lines = "".join(json.dumps(json_safe(r)[0], allow_nan=False) + "\n" for r in history)
        atomic_write_text(self.path / METRICS, lines)

    def _repair_best(self, state: dict, fork_source: Path | None) -> None:
        """Make best.pt the state at the end of the history's best epoch, where one has it.
        An unreadable best.pt is set aside with a warning, never in the way of last.pt."""
        best = best_epoch(state["history"])
        target = self.checkpoints / "best.pt"
        candidates = [target] + ([fork_source / "checkpoints" / "best.pt"] if fork_source else [])
        damaged = None
        for path in candidates:
            if not path.is_file():
                continue
            try:
                candidate = load_checkpoint(path)
            except UsageError as err:
                reason = str(err).split(": ", 1)[-1][:150]
                if path != target:
                    warn(f"{path} is damaged ({reason}); best.pt is not copied from it")
                    continue
                damaged = target.with_name("best.pt.damaged")
                n = 1
                while damaged.exists():
                    n += 1
                    damaged = target.with_name(f"best.pt.damaged{n}")
                os.replace(target, damaged)
                warn(f"{target} is damaged ({reason}); moved it to {damaged.name}"
                     + ("; rebuilt best.pt from last.pt" if is_end_of(state, best) else
                        "; best.pt comes back at the next best epoch"))
                continue
            if is_end_of(candidate, best):
                if path != target:
                    atomic_save(candidate, target)
                return
        if is_end_of(state, best):
            atomic_save(state, target)
        else:
            target.unlink(missing_ok=True)

    def _log_hparams(self, config: dict):
        """The run's settings for TensorBoard's HParams dashboard; its metrics are the
        val/* scalars logged every epoch."""
        from torch.utils.tensorboard.summary import hparams
        keys = ("arch", "batch_size", "lr", "optimizer", "weight_decay", "schedule", "warmup",
                "loss", "clip", "precision", "epochs", "epoch_size", "seed")
        settings = {k: config[k] if isinstance(config[k], (int, float, str, bool)) else str(config[k])
                    for k in keys}
        metrics = {f"val/{k}": 0.0 for k in ("loss", *METRIC_NAMES)}

        def write(writer):
            for summary in hparams(settings, metrics):
                writer.file_writer.add_summary(summary)
        return write

    def _events(self, write) -> None:
        """write(SummaryWriter), unless events can't be written: then one warning, and the
        run goes on without them (its checkpoints say more clearly when the disk is full)."""
        if self.writer is None:
            return
        try:
            write(self.writer)
        except Exception as err:  # OSError from the writer thread, re-raised here
            warn(f"TensorBoard events can't be written to {self.path} ({first_line(err)}); "
                 f"training goes on without them")
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None

    def log(self, step: int, scalars: dict, picture=None) -> None:
        if not self.lead:
            return

        def write(writer):
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)
            if picture is not None:  # once an epoch: write the epoch's events out
                writer.add_image("val/input_truth_prediction", picture, step,
                                 dataformats="HW" if picture.ndim == 2 else "HWC")
                writer.flush()
        self._events(write)

    def write_config(self, config: dict) -> None:
        """config.json again, after the run changed its config (a shortened schedule)."""
        if self.lead:
            write_json(self.path / "config.json", config)

    def save(self, state: dict, improved: bool = False) -> None:
        """last.pt, then best.pt, then metrics.jsonl: a kill between two of them is repaired
        by `open` from last.pt. A failed write says what last.pt holds and how to go on."""
        if not self.lead:
            return
        try:
            atomic_save(state, self.checkpoints / "last.pt")
            if improved:
                atomic_save(state, self.checkpoints / "best.pt")
            self._write_metrics(state["history"])
        except WriteError as err:
            kept = (f"{self.checkpoints / 'last.pt'} holds the last state saved: once the folder can "
                    f"be written again, continue with the same command and --resume"
                    if has_checkpoint(self.path) else
                    "nothing was saved yet: once the folder can be written again, the same command "
                    "starts again")
            raise WriteError(f"{err}. {kept}") from None

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        if self._excepthook is not None:
            threading.excepthook = self._excepthook
        if self._lock:
            self._lock.close()
        self.writer, self._lock, self._excepthook = None, None, None


def best_epoch(history: list[dict]) -> int | None:
    """The finished epoch with the lowest val_loss (the first of equals), or None."""
    return min(history, key=lambda r: r["val_loss"])["epoch"] if history else None


def is_end_of(state: dict, epoch: int | None) -> bool:
    return epoch is not None and state.get("epoch") == epoch and not state.get("position", 0)
