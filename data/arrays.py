"""Your own sequences as datasets: .npy/.npz arrays in any of LAYOUTS, and a held-out tail.

main.py trains on them with --train-data and evaluate.py tests on them with --test-set.
Arrays are uint8 (0-255) or float in [0, 1]; a dataset item is float32 in [0, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils import UsageError, check

LAYOUTS = ("TNHW", "NTHW", "NTCHW")  # axis orders of a sequence array; TNHW is mnist_test_seq.npy's


def load_npy(path: Path) -> np.ndarray:
    """Memory-map a .npy file read-only, or raise UsageError saying what is wrong with it."""
    check(not path.is_dir(), f"{path} is a directory; pass a .npy file")
    check(path.exists(), f"{path}: no such file")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # e.g. "mmap length is greater than file size"
        raise UsageError(f"{path}: not a readable .npy file, truncated or not numpy ({e})") from None


def load_sequences(path_or_array, layout=None):
    """Load sequences as (N, T, C, H, W), keeping the dtype (uint8 or float in [0, 1]).

    `path_or_array` is an array, a .npy file, or a .npz file holding either a single
    array or one named "sequences". `layout` is "TNHW" (mnist_test_seq.npy),
    "NTHW" or "NTCHW"; None means NTCHW for 5-D and NTHW for 4-D arrays. Returns a
    view where it can (a .npy file is memory-mapped).
    """
    if isinstance(path_or_array, (str, os.PathLike)):
        path = Path(path_or_array)
        name = str(path)
        if path.suffix == ".npy":
            arr = load_npy(path)
        elif path.suffix == ".npz":
            check(path.is_file(), f"{path}: no such file")
            with np.load(path, allow_pickle=False) as z:
                if len(z.files) == 1:
                    arr = z[z.files[0]]
                elif "sequences" in z.files:
                    arr = z["sequences"]
                else:
                    raise UsageError(f"{name}: holds arrays {z.files}; save a single array "
                                     f"or name the sequences 'sequences'")
        else:
            raise UsageError(f"{name}: expected a .npy or .npz file")
    else:
        arr = np.asarray(path_or_array)
        name = f"array {arr.dtype} {arr.shape}"

    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise UsageError(f"{name}: dtype {arr.dtype}; expected uint8 (0-255) or float "
                         f"in [0, 1]")
    if layout is None:
        layout = "NTCHW" if arr.ndim == 5 else "NTHW"
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if arr.ndim != len(layout):
        raise UsageError(f"{name}: shape {arr.shape} is {arr.ndim}-D, but layout "
                         f"{layout} needs {len(layout)} dimensions")
    if arr.dtype != np.uint8 and arr.size:
        lo, hi = arr.min(), arr.max()
        if not (lo >= 0 and hi <= 1):  # also catches NaN
            raise UsageError(f"{name}: float values span [{lo}, {hi}]; expected [0, 1] "
                             f"(divide uint8 frames by 255)")
    if layout == "TNHW":
        arr = arr.transpose(1, 0, 2, 3)  # (N, T, H, W)
    if arr.ndim == 4:
        arr = arr[:, :, None]  # (N, T, 1, H, W)
    return arr


class SequenceArrayDataset(Dataset):
    """(inputs, targets) from an array of sequences (N, T, C, H, W), uint8 or float.

    Item i is float32 in [0, 1] (uint8 divided by 255): the first T_in frames of
    sequence `indices[i]`, shape (T_in, C, H, W), and the next T_out, shape
    (T_out, C, H, W). `indices` defaults to all sequences (see `split_holdout`).
    """

    def __init__(self, sequences, n_frames_input, n_frames_output, indices=None):
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

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        n_frames = self.n_frames_input + self.n_frames_output
        # A copy: the array may be a read-only memmap, which torch can't wrap.
        seq = np.array(self.sequences[self.indices[i], :n_frames])  # (T, C, H, W)
        frames = torch.from_numpy(seq)
        frames = frames.float().div_(255) if seq.dtype == np.uint8 else frames.float()
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
