"""Synthetic MNIST in the real IDX format, so tests exercise the real loader without data."""

import gzip
import struct
from pathlib import Path

import numpy as np


def synthetic_digits(n: int, seed: int = 0) -> np.ndarray:
    """n digit-like images (n, 28, 28) uint8: 2-3 thick strokes in the central 20x20 box."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    out = np.zeros((n, 28, 28), np.uint8)
    for k in range(n):
        ink = np.zeros((28, 28))
        for _ in range(rng.integers(2, 4)):
            (y0, x0), (y1, x1) = rng.uniform(4, 24, size=(2, 2))
            dy, dx = y1 - y0, x1 - x0
            t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-9), 0, 1)
            dist = np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
            ink = np.maximum(ink, np.clip(2.0 - dist, 0, 1))  # about 3 px wide, soft edges
        out[k] = np.rint(ink * 255)
    return out


def write_idx_images(path, images: np.ndarray) -> Path:
    """Write uint8 images (N, rows, cols) as a gzipped IDX file, as MNIST ships them."""
    path = Path(path)
    n, rows, cols = images.shape
    header = struct.pack(">4i", 2051, n, rows, cols)  # magic 0x0803: ubyte, 3 dimensions
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(header + np.ascontiguousarray(images, np.uint8).tobytes())
    return path


def make_fake_mnist(root, n_train: int = 1000, n_test: int = 500, seed: int = 0) -> Path:
    """A folder with train- and t10k-images-idx3-ubyte.gz of synthetic digits."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_idx_images(root / "train-images-idx3-ubyte.gz", synthetic_digits(n_train, seed))
    write_idx_images(root / "t10k-images-idx3-ubyte.gz", synthetic_digits(n_test, seed + 1))
    return root
