"""Small helpers every entry point needs: user errors, warnings and the CLI wrapper, memory checks, text tables, RNG state.

Imports only the standard library, numpy and torch, so that the model files may use it
(model.py, net_params.py) without pulling in plotting or metrics libraries.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

import numpy as np
import torch

DEFAULT_DATA_ROOT = "data/mnist"  # where MNIST and mnist_test_seq.npy live unless a flag says

# ---------------------------------------------------------------------------------------
# Errors and command lines
# ---------------------------------------------------------------------------------------


class UsageError(ValueError):
    """Something the user can fix: a flag, a file, a preset. The CLIs print it as one line.

    Any other exception is a bug and keeps its traceback.
    """


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting with 2."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def run_cli(main, argv=None) -> int:
    """Run a CLI's main(argv): user errors become one `error: ...` line and exit code 1.

    A stop by a signal exits with 128 + its number, as shells report it (main.py's
    message says how to resume). Output that can't be written (a full disk behind
    `> log`, a `| tee` that died) is dropped instead of stopping the command.
    Warnings (e.g. how many values --value-range clips) are one `warning: ...` line.
    """
    warnings.formatwarning = _warning_line  # the user reads the message, not our source line
    with quiet_streams():
        try:
            main(sys.argv[1:] if argv is None else argv)
        except (UsageError, OSError) as err:  # OSError: a path the user named can't be read or written
            print(f"error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as err:
            print(f"interrupted: {err}" if str(err) else "interrupted", file=sys.stderr)
            return getattr(err, "exit_code", 130)  # 130: SIGINT's
    return 0


def warn(message: str) -> None:
    """One `warning: ...` line on stderr: something the user should know, that doesn't stop the run."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class QuietStream:
    """A text stream (stdout, stderr) whose writes never raise: after the first failure it
    is dropped, and its file descriptor points at the null device so that the
    interpreter's last flush at exit succeeds too."""

    def __init__(self, stream):
        self.stream, self.failed = stream, None

    def _drop(self, err: Exception) -> None:
        self.failed = err
        with contextlib.suppress(Exception):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)

    def write(self, text):
        if self.failed is None:
            try:
                return self.stream.write(text)
            except (OSError, ValueError) as err:  # ENOSPC, EPIPE, EIO; ValueError: closed
                self._drop(err)
        return len(text)

    def flush(self):
        if self.failed is None:
            try:
                self.stream.flush()
            except (OSError, ValueError) as err:
                self._drop(err)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def quiet_streams():
    """sys.stdout and sys.stderr as QuietStreams for the duration of a `with` block."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s if s is None or isinstance(s, QuietStream) else QuietStream(s)
                              for s in saved)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = saved


def check(condition: bool, message: str) -> None:
    """Raise UsageError(message) unless condition holds."""
    if not condition:
        raise UsageError(message)


def first_line(err: BaseException) -> str:
    """`Type: first line of the message`: an exception from deep inside torch as one line
    of a UsageError."""
    text = str(err)
    # weights_only failures open with a generic paragraph; the cause is on this line
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split(". Please", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


# ---------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------


def memory_available() -> int | None:
    """Bytes of RAM this process can still get (Linux: MemAvailable, within a cgroup's
    limit), the machine's total elsewhere, or None where neither is known."""
    available = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError):  # cgroup v2: a container's limit
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read())
            room = max(int(limit) - used, 0)
            available = room if available is None else min(available, room)
    if available is None:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return available


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def check_memory(needed: int, what: str, fix: str, available: int | None = None) -> None:
    """UsageError if `what` needs more than the memory available (RAM unless `available`
    is given): `fix` says which flag to change."""
    available = memory_available() if available is None else available
    check(available is None or needed <= available,
          f"{what} needs about {format_bytes(needed)} of memory, but "
          f"{format_bytes(available or 0)} is available; {fix}")


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table: one line per row, columns (header, key, format); None or missing is "-".

    The first column is left-aligned, the others right-aligned.
    """
    cells = [[header for header, _, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else fmt.format(row[key])
                      for _, key, fmt in columns])
    widths = [max(len(line[k]) for line in cells) for k in range(len(columns))]
    lines = ["  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])])
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Random number generators
# ---------------------------------------------------------------------------------------


def rng_state():
    """The global RNG states as a dict of tensors and numbers, safe for torch.load(weights_only=True).

    {"torch": CPU generator state (ByteTensor), "cuda": list of per-GPU states ([] without
    CUDA), "numpy": numpy's global MT19937 state}. The project's own randomness comes from
    torch and from explicitly seeded generators; numpy's global state is kept so that code
    a researcher adds that draws from np.random resumes exactly too.
    """
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    return {"torch": torch.get_rng_state(), "cuda": list(cuda), "numpy": numpy_state}


def set_rng_state(state):
    """Restore what rng_state() captured. GPUs beyond those saved (or visible) are left alone."""
    # a checkpoint loaded with map_location="cuda" puts these on the GPU; the setters need CPU bytes
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(state.get("cuda", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.to("cpu", torch.uint8), index)
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state(("MT19937", s["keys"].cpu().numpy().astype(np.uint32), s["pos"],
                             s["has_gauss"], s["cached_gaussian"]))


def seed_everything(seed):
    """Seed torch's CPU and CUDA generators (torch.manual_seed covers both) and numpy's."""
    torch.manual_seed(seed)
    np.random.seed(seed)
