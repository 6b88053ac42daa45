"""Your own sequences as datasets: .npy, .npz and HDF5 arrays in any axis order and in the data's own units, and a held-out tail.

main.py trains on them with --train-data and evaluate.py tests on them with --test-set.
A file is FILE.npy, FILE.npz or FILE.h5:DATASET (h5py, an optional dependency, reads
HDF5). A layout names the file's axes in order: N (sequences), T (frames), H, W and
optionally C (channels), e.g. NTHW, NTCHW, TNHW (mnist_test_seq.npy) or NHWT (SEVIR).

Nothing is read whole where it can be avoided: a .npy file is memory-mapped and an HDF5
dataset is read one sequence at a time (each DataLoader worker opens the file itself), so
neither has to fit in memory. A .npz is decompressed whole: save large data as .npy or .h5.

Values. Without a value range, uint8 frames mean 0-255 and float frames must lie in
[0, 1]: the data's units are then [0, 1]. With a value range (LO, HI) (--value-range), any
integer or float numbers are the data's own units (dBZ, mm/h, VIL pixels) and are clipped
to [LO, HI]; the network sees them mapped to [0, 1] (model.to_unit). NaNs (radar's missing
pixels) are refused unless a fill value is named (--fill-nan).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from utils import UsageError, check

LAYOUTS = ("TNHW", "NTHW", "NTCHW")  # the common ones; any order of N, T, H, W (and C) works
AXES = "NTCHW"                       # the order a dataset hands out: (N, T, C, H, W)
H5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
MISSING_H5PY = "needs h5py to read HDF5: pip install h5py"
SCAN_BYTES = 64 << 20  # values are checked block by block, so a large file is never held whole


def parse_layout(text: str) -> str:
    """A --layout string, upper-cased; UsageError unless it names N, T, H and W once each
    and C at most once."""
    layout = str(text).upper()
    letters = sorted(layout)
    if letters not in (sorted("NTHW"), sorted("NTCHW")):
        raise UsageError(f"unknown layout {text!r}; a layout names the file's axes in order, each "
                         f"of N (sequences), T (frames), H and W once and C (channels) at most "
                         f"once, e.g. NTHW, NTCHW, TNHW or NHWT (SEVIR)")
    return layout


def layout_type(text: str) -> str:
    """parse_layout for argparse: its error reads `argument --layout: invalid choice: ...`."""
    import argparse
    try:
        return parse_layout(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(f"invalid choice: {err}") from None


# ----------------------------------------------------------------------------------------
# Files

def split_spec(spec) -> tuple[Path, str | None]:
    """"FILE.h5:DATASET" -> (FILE.h5, DATASET); any other path -> (path, None)."""
    text = os.fspath(spec)
    head, sep, tail = text.rpartition(":")
    if sep and Path(head).suffix.lower() in H5_SUFFIXES:
        return Path(head), tail
    return Path(text), None


def require_h5py(path):
    try:
        import h5py
    except ImportError:
        raise UsageError(f"{path}: {MISSING_H5PY}") from None
    return h5py


def _h5_datasets(f) -> list[str]:
    found = []
    f.visititems(lambda name, item: found.append(f"{name} {item.dtype} {item.shape}")
                 if hasattr(item, "shape") else None)
    return found


class H5Array:
    """An HDF5 dataset, read lazily: shape and dtype now, values on indexing. The file is
    opened on first use in each process and never pickled, so DataLoader workers (forked or
    spawned) each read through their own handle."""

    def __init__(self, path: Path, key: str, spec: str):
        h5py = require_h5py(spec)
        check(not path.is_dir(), f"{path} is a directory; pass FILE.h5:DATASET")
        check(path.exists(), f"{path}: no such file")
        try:
            f = h5py.File(path, "r")
        except OSError as err:
            raise UsageError(f"{path}: not a readable HDF5 file ({err})") from None
        with f:
            held = _h5_datasets(f)
            listing = "; ".join(held) if held else "no datasets"
            check(key, f"{path}: name the dataset as {path}:DATASET; it holds: {listing}")
            item = f.get(key)
            check(item is not None and hasattr(item, "shape"),
                  f"{path} has no dataset {key!r}; it holds: {listing}")
            self.shape, self.dtype = tuple(item.shape), item.dtype
        self.path, self.key = path, key
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape))
        self._pid = self._file = self._dataset = None

    def __getitem__(self, key):
        if self._pid != os.getpid():  # a new process: a handle of the parent must not be shared
            import h5py
            self._file = h5py.File(self.path, "r")
            self._dataset, self._pid = self._file[self.key], os.getpid()
        return self._dataset[key]

    def __len__(self):
        return self.shape[0]

    def __getstate__(self):
        return {**self.__dict__, "_pid": None, "_file": None, "_dataset": None}


def load_npy(path: Path) -> np.ndarray:
    """Memory-map a .npy file read-only, or raise UsageError saying what is wrong with it."""
    check(not path.is_dir(), f"{path} is a directory; pass a .npy file")
    check(path.exists(), f"{path}: no such file")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # e.g. "mmap length is greater than file size"
        if _npy_holds_objects(path):
            raise UsageError(_objects(path)) from None
        raise UsageError(f"{path}: not a readable .npy file, truncated or not numpy ({e})") from None
    return arr


def _npy_holds_objects(path: Path) -> bool:
    """Whether a .npy file's header declares Python objects (np.save(..., allow_pickle=True))."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            return read(f)[2].hasobject
    except (ValueError, OSError, EOFError):
        return False


def _objects(name) -> str:
    return (f"{name}: holds Python objects (dtype object), which are not loaded (unpickling runs "
            f"code); save a numeric array, e.g. np.save(path, np.asarray(x, dtype=np.float32))")


def _load_npz(path: Path) -> np.ndarray:
    check(path.is_file(), f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if len(z.files) == 1:
                key = z.files[0]
            elif "sequences" in z.files:
                key = "sequences"
            else:
                raise UsageError(f"{path}: holds arrays {z.files}; save a single array "
                                 f"or name the sequences 'sequences'")
            return z[key]  # decompressed whole: .npy or .h5 for data that doesn't fit in memory
    except ValueError as e:
        if isinstance(e, UsageError):
            raise
        if str(e).startswith("Object arrays cannot be loaded"):
            raise UsageError(_objects(path)) from None
        raise UsageError(f"{path}: not a readable .npz file ({e})") from None
    except (OSError, EOFError) as e:
        raise UsageError(f"{path}: not a readable .npz file ({e})") from None


def open_array(spec):
    """(array in the file's own axis order, its name for messages), read lazily: a .npy
    memory-mapped, an HDF5 dataset as an H5Array; a .npz is read whole."""
    path, key = split_spec(spec)
    name = os.fspath(spec)
    suffix = path.suffix.lower()
    if suffix in H5_SUFFIXES:
        return H5Array(path, key or "", name), name
    if suffix == ".npy":
        return load_npy(path), name
    if suffix == ".npz":
        return _load_npz(path), name
    raise UsageError(f"{name}: expected a .npy or .npz file, or FILE.h5:DATASET for HDF5")


# ----------------------------------------------------------------------------------------
# Sequences in (N, T, C, H, W) order

class Reordered:
    """A lazy (N, T, C, H, W) view of an array-like in another axis order (an H5Array):
    indexing reads only the selected block from the source, then reorders it."""

    def __init__(self, source, layout: str):
        self.source, self.layout = source, layout
        sizes = dict(zip(layout, source.shape))
        self.shape = tuple(sizes.get(axis, 1) for axis in AXES)
        self.dtype, self.ndim = source.dtype, 5

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = dict(zip(AXES, key + (slice(None),) * (5 - len(key))))
        block = np.asarray(self.source[tuple(key[axis] for axis in self.layout)])
        kept = [axis for axis in self.layout if isinstance(key[axis], slice)]  # block's axes
        wanted = [axis for axis in AXES if isinstance(key[axis], slice)]
        if "C" not in self.layout and "C" in wanted:
            block, kept = block[..., None], kept + ["C"]
            block = block[..., key["C"]]
        return block.transpose([kept.index(axis) for axis in wanted])

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def _as_ntchw(arr, layout: str):
    """The (N, T, C, H, W) view of `arr` in `layout`: a numpy view (lazy on a memmap), or a
    Reordered view of an HDF5 dataset."""
    if isinstance(arr, np.ndarray):
        order = [layout.index(axis) for axis in AXES if axis in layout]
        arr = arr.transpose(order)
        return arr if "C" in layout else arr[:, :, None]
    return Reordered(arr, layout)


def _blocks(arr):
    """The array, in its own axis order, a block of whole rows along the first axis at a time."""
    row = max(1, arr.size // max(1, arr.shape[0]) * arr.dtype.itemsize)
    step = max(1, SCAN_BYTES // row)
    for start in range(0, arr.shape[0], step):
        yield np.asarray(arr[start:start + step])


def scan_values(arr, value_range=None) -> dict:
    """Counts over every value, block by block: NaNs, values outside value_range (NaNs not
    counted), and the smallest and largest number. {"nan", "outside", "min", "max"}."""
    nan = outside = 0
    lo = hi = None
    for block in _blocks(arr):
        if np.issubdtype(block.dtype, np.floating):
            isnan = np.isnan(block)
            nan += int(isnan.sum())
            numbers = block[~isnan] if isnan.any() else block
        else:
            numbers = block
        if numbers.size:
            b_lo, b_hi = numbers.min(), numbers.max()
            lo = b_lo if lo is None else min(lo, b_lo)
            hi = b_hi if hi is None else max(hi, b_hi)
            if value_range is not None:
                outside += int(np.count_nonzero((numbers < value_range[0]) | (numbers > value_range[1])))
    return {"nan": nan, "outside": outside, "min": lo, "max": hi}


def _range_text(value_range) -> str:
    return f"[{value_range[0]:g}, {value_range[1]:g}]"


def check_values(arr, name: str, value_range=None, fill_nan=None, *, warn: bool = True) -> None:
    """What the data's values allow: UsageError for NaNs without a fill value, or for
    numbers the mapping to [0, 1] can't take; one warning (where `warn`) with the count of
    values that value_range clips. `arr` in any axis order."""
    integer = np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_
    floating = np.issubdtype(arr.dtype, np.floating)
    if value_range is None:
        check(arr.dtype == np.uint8 or floating,
              f"{name}: dtype {arr.dtype}; expected uint8 (0-255) or float in [0, 1], or give "
              f"--value-range LO HI to train on other numbers in their own units")
    else:
        check(integer or floating, f"{name}: dtype {arr.dtype}; expected integer or float numbers")
    limits = (0.0, 1.0) if value_range is None else value_range
    if fill_nan is not None:
        check(limits[0] <= fill_nan <= limits[1],
              f"--fill-nan {fill_nan:g} lies outside the value range {_range_text(limits)}"
              + ("" if value_range is not None else " (give --value-range LO HI for other units)"))
    if integer:
        info = np.iinfo(arr.dtype)
        if value_range is None or value_range[0] <= info.min and info.max <= value_range[1]:
            return  # no NaNs, and every value this dtype holds lies in the range
    stats = scan_values(arr, value_range)
    size = arr.size
    check(stats["nan"] == 0 or fill_nan is not None,
          f"{name}: {stats['nan']:,} of {size:,} values are NaN (missing data?); expected numbers: "
          f"fill them with --fill-nan VALUE, in the data's units")
    if value_range is None and arr.dtype != np.uint8 and stats["min"] is not None:
        lo, hi = stats["min"], stats["max"]
        check(lo >= 0 and hi <= 1, f"{name}: float values span [{lo}, {hi}]; expected [0, 1] "
                                   f"(divide uint8 frames by 255), or give --value-range LO HI")
    if stats["outside"] and warn:
        warnings.warn(f"{name}: {stats['outside']:,} of {size:,} values lie outside the value "
                      f"range {_range_text(value_range)} (--value-range) and are clipped to it; "
                      f"the data span [{stats['min']:g}, {stats['max']:g}]", stacklevel=2)


class Opened(NamedTuple):
    sequences: object  # the (N, T, C, H, W) view
    raw: object        # the array in the file's own order
    name: str          # the file (or the array) for messages
    layout: str        # the file's axes


def open_sequences(path_or_array, layout=None, *, guess_layout: bool = True) -> Opened:
    """Open sequences without reading their values: the (N, T, C, H, W) view, checked
    against `layout`.

    `path_or_array` is an array, or a file: .npy, .npz (a single array or one named
    "sequences") or FILE.h5:DATASET. `layout` names the axes in the array's order (see
    parse_layout); None means NTCHW for 5-D arrays, and NTHW for 4-D ones where
    `guess_layout`, else a 4-D array without a layout is refused: it could as well be
    make-test-set's (T, N, H, W). The view is lazy where it can be: a .npy file is
    memory-mapped and an HDF5 dataset read sequence by sequence on indexing.
    """
    if isinstance(path_or_array, (str, os.PathLike)):
        arr, name = open_array(path_or_array)
    else:
        arr = np.asarray(path_or_array)
        name = f"array {arr.dtype} {arr.shape}"
    if arr.dtype.hasobject:
        raise UsageError(_objects(name))
    check(arr.size > 0, f"{name}: the array is empty, shape {arr.shape}")
    if layout is None:
        check(arr.ndim != 4 or guess_layout,
              f"{name}: shape {arr.shape} is 4-D; name its axes with --layout, e.g. NTHW (N "
              f"sequences of T frames), TNHW (make-test-set's and mnist_test_seq.npy's order) "
              f"or NHWT (SEVIR's)")
        layout = "NTCHW" if arr.ndim == 5 else "NTHW"
    layout = parse_layout(layout)
    if arr.ndim != len(layout):
        raise UsageError(f"{name}: shape {arr.shape} is {arr.ndim}-D, but layout "
                         f"{layout} needs {len(layout)} dimensions")
    return Opened(_as_ntchw(arr, layout), arr, name, layout)


def load_sequences(path_or_array, layout=None, *, value_range=None, fill_nan=None):
    """open_sequences(path_or_array, layout)'s view, after check_values(value_range,
    fill_nan) read every value once, block by block. Keeps the dtype."""
    opened = open_sequences(path_or_array, layout)
    check_values(opened.raw, opened.name, value_range, fill_nan)
    return opened.sequences


class SequenceArrayDataset(Dataset):
    """(inputs, targets) from sequences (N, T, C, H, W) of any dtype, in the data's units.

    Item i is float32: the first T_in frames of sequence `indices[i]`, shape
    (T_in, C, H, W), and the next T_out, shape (T_out, C, H, W). Without `value_range`,
    uint8 is divided by 255 and floats are taken as they are ([0, 1]); with it, values are
    the data's own, NaNs replaced by `fill_nan` and everything clipped to [LO, HI].
    `indices` defaults to all sequences (see `split_holdout`).
    """

    def __init__(self, sequences, n_frames_input, n_frames_output, indices=None, *,
                 value_range=None, fill_nan=None):
        super().__init__()
        if sequences.ndim != 5:
            raise UsageError(f"sequences must be (N, T, C, H, W), got shape "
                             f"{sequences.shape}; load_sequences converts other layouts")
        n, t = sequences.shape[:2]
        if n_frames_input < 1 or n_frames_output < 1 or n_frames_input + n_frames_output > t:
            raise UsageError(f"{n_frames_input} input + {n_frames_output} output frames "
                             f"don't fit in sequences of {t} frames")
        indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise UsageError(f"indices span [{indices.min()}, {indices.max()}] but there "
                             f"are {n} sequences")
        self.sequences = sequences
        self.indices = indices
        self.n_frames_input = n_frames_input
        self.n_frames_output = n_frames_output
        self.value_range = None if value_range is None else tuple(float(v) for v in value_range)
        self.fill_nan = fill_nan

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        n_frames = self.n_frames_input + self.n_frames_output
        # A copy: the array may be a read-only memmap, which torch can't wrap.
        seq = np.array(self.sequences[int(self.indices[i]), :n_frames])  # (T, C, H, W)
        frames = torch.from_numpy(seq)
        frames = frames.float().div_(255) if seq.dtype == np.uint8 and self.value_range is None \
            else frames.float()
        if self.fill_nan is not None:
            frames = torch.where(torch.isnan(frames), self.fill_nan, frames)
        if self.value_range is not None:
            frames = frames.clamp_(*self.value_range)
        return frames[:self.n_frames_input], frames[self.n_frames_input:]


def split_holdout(n, holdout_fraction=0.1, min_holdout=1):
    """Split range(n) into (train_indices, val_indices); validation is the tail.

    The tail holds round(n * holdout_fraction) sequences, at least `min_holdout`, and
    at least one sequence is left for training.
    """
    if not 0 <= holdout_fraction < 1:
        raise UsageError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    n_val = max(min_holdout, round(n * holdout_fraction))
    if n_val >= n:
        raise UsageError(f"holding out {n_val} of {n} sequences leaves none to train on")
    return np.arange(n - n_val), np.arange(n - n_val, n)
