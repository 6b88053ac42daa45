"""Files written atomically (checkpoints, JSON, pictures, downloads), and checkpoints loaded safely.

A crash never leaves a half-written file under its final name; a checkpoint loads with
torch.load(weights_only=True), so only tensors and plain Python containers come back.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid

import torch

from utils import UsageError, first_line

TMP_SUFFIX = ".tmp"  # atomic_write's temporary files end so; a crash can leave one behind


def atomic_write(path, write):
    """Call write(file) on a temporary file next to `path`, then rename it onto `path`.

    A crash or an exception leaves `path` as it was: the rename is atomic on POSIX and
    Windows when both names are in the same directory. Parent directories are created.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    # os.open with mode 0o666 applies the umask, unlike tempfile's 0o600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path, value) -> None:
    """`value` as indented JSON: config.json, evaluate.py's and the tools' --json."""
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def write_rows(path, rows: list[dict]) -> None:
    """A tool's result rows for --json: one row as an object, several as {"runs": [...]}."""
    write_json(path, rows[0] if len(rows) == 1 else {"runs": rows})


def atomic_save(obj, path):
    """torch.save(obj, path) through a temporary file, so `path` is never left half-written."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict (with at least "model" and "config") written by atomic_save.

    Uses torch.load(weights_only=True), so only tensors and plain Python containers load.
    Raises UsageError naming the path if the file is missing or is not such a checkpoint.
    """
    path = os.fspath(path)
    prefix = f"{path} is not a checkpoint written by main.py"
    if not os.path.isfile(path):
        problem = "it is a directory" if os.path.isdir(path) else "no such file"
        raise UsageError(f"{prefix}: {problem}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load raises many types for foreign files (KeyError, EOFError, ...)
        raise UsageError(f"{prefix}: torch.load failed with {first_line(err)}") from err
    if not isinstance(checkpoint, dict):
        raise UsageError(f"{prefix}: expected a dict, found {type(checkpoint).__name__}")
    missing = [key for key in ("model", "config") if key not in checkpoint]
    if missing:
        raise UsageError(f"{prefix}: the dict lacks {missing} (keys: {sorted(map(str, checkpoint))})")
    return checkpoint


def load_weights(model: torch.nn.Module, weights: dict, source, advice: str = "") -> None:
    """model.load_state_dict(weights), strictly; weights of another model or version raise
    one UsageError naming `source` (the file), with `advice` on what to do instead."""
    try:
        model.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UsageError(f"{source}: its weights don't fit the model its config describes "
                         f"({first_line(err)})" + (f"; {advice}" if advice else "")) from None
