"""Files written atomically (checkpoints, JSON, pictures, downloads), and checkpoints loaded safely.

A crash never leaves a half-written file under its final name, and a write that fails
(a full disk, a read-only folder) is one WriteError naming the file; a checkpoint loads
with torch.load(weights_only=True), so only tensors and plain Python containers come back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import uuid

import torch

from utils import UsageError, first_line, format_bytes, warn

TMP_SUFFIX = ".tmp"  # atomic_write's temporary files end so; a crash can leave one behind
# Errors of the file system being written, as opposed to those of what produces the bytes
# (a download's network errors are OSErrors too).
FULL_ERRNOS = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno, name)}
WRITE_ERRNOS = FULL_ERRNOS | {errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}


class WriteError(UsageError):
    """A file could not be written: the message names it, and says when the disk may be full.
    Whatever the file held before is intact."""


def _write_error(err: BaseException) -> OSError | None:
    """The file-system OSError behind `err`, if any: torch.save reports a full disk as
    "RuntimeError: ... unexpected pos" with the OSError as its context."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


def _explain(path: str, err: OSError) -> WriteError:
    directory = os.path.dirname(os.path.abspath(path))
    message = f"can't write {path}: {err.strerror or err}"
    if err.errno in FULL_ERRNOS:
        free = ""
        with contextlib.suppress(OSError):
            free = f", {format_bytes(shutil.disk_usage(directory).free)} free in {directory}"
        message += f"; the disk may be full{free}"
    return WriteError(message)


def atomic_write(path, write):
    """Call write(file) on a temporary file next to `path`, then rename it onto `path`.

    A crash or an exception leaves `path` as it was: the rename is atomic on POSIX and
    Windows when both names are in the same directory. Parent directories are created.
    Raises WriteError where the file system refuses the write (full, read-only, ...).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        os.makedirs(directory, exist_ok=True)
        # os.open with mode 0o666 applies the umask, unlike tempfile's 0o600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as err:
        raise (_explain(path, err) if err.errno in WRITE_ERRNOS else err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _write_error(err)
        if cause is not None:
            raise _explain(path, cause) from None
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def json_safe(value, where: str = ""):
    """(value with every NaN and inf replaced by None, the keys where that happened): strict
    JSON parsers refuse the bare NaN that json.dumps writes."""
    replaced = []

    def clean(v, key):
        if isinstance(v, float) and not math.isfinite(v):
            replaced.append(key or "a value")
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{key}.{k}" if key else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, f"{key}[{i}]") for i, x in enumerate(v)]
        return v

    return clean(value, where), replaced


def write_json(path, value) -> None:
    """`value` as indented JSON: config.json, evaluate.py's and the tools' --json. NaN and
    inf become null, with a warning naming them."""
    value, replaced = json_safe(value)
    if replaced:
        shown = ", ".join(replaced[:5]) + (f" and {len(replaced) - 5} more" if len(replaced) > 5 else "")
        warn(f"{path}: {shown} {'is' if len(replaced) == 1 else 'are'} not a finite number; "
             f"written as null")
    atomic_write_text(path, json.dumps(value, indent=2, allow_nan=False) + "\n")


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
