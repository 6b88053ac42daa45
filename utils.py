"""Small helpers every entry point needs: user errors and the CLI wrapper, text tables, RNG state.

Imports only the standard library, numpy and torch, so that the model files may use it
(model.py, net_params.py) without pulling in plotting or metrics libraries.
"""

from __future__ import annotations

import argparse
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
    """Run a CLI's main(argv): user errors become one `error: ...` line and exit code 1,
    and warnings (e.g. how many values --value-range clips) one `warning: ...` line."""
    warnings.formatwarning = _warning_line  # the user reads the message, not our source line
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (UsageError, OSError) as err:  # OSError: a path the user named can't be read or written
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # main.py's message says how to resume
        print(f"interrupted: {err}" if str(err) else "interrupted", file=sys.stderr)
        return 130
    return 0


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
