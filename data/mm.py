"""Moving MNIST: MNIST files and their download, on-the-fly sequences, the fixed test set.

Moving MNIST is defined by Srivastava et al. 2015, "Unsupervised Learning of Video
Representations using LSTMs" (arXiv 1502.04681): 28x28 MNIST digits bounce inside a
64x64 canvas; each starts at a random position with a random direction, moves 0.1 of
the unit square per frame, reflects at the borders, and overlapping digits are
combined by a pixel-wise max.

Run as a script (`python -m data.mm --help`):
    python -m data.mm download --root data/mnist [--moving-mnist-test]
    python -m data.mm make-test-set --root data/mnist --out test.npy --num 10000 --num-digits 2

Digit pools. Training sequences use the 60,000 MNIST training digits and validation /
test sequences the 10,000 test digits. Where only the test file is available, digits
0-7,999 make training sequences and 8,000-9,999 the held-out ones, so no digit is seen
in both; numbers from that split can't be compared with published ones.

Every sequence is a pure function of its seed; the global `random` / `np.random`
state is never used, so runs are reproducible whatever else touches it.
"""

import gzip
import hashlib
import math
import struct
import sys
import urllib.error
import urllib.request
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from checkpoints import atomic_write
from data.arrays import load_npy
from utils import DEFAULT_DATA_ROOT, ArgumentParser, UsageError, check, check_memory, run_cli

# -----------------------------------------------------------------------------
# files and where to get them

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
MNIST_FILES = {
    TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
}
MOVING_MNIST_TEST = ("mnist_test_seq.npy", "be083ec986bfe91a449d63653c411eb2")
MNIST_MIRRORS = [  # the ones torchvision uses, in its order
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
MOVING_MNIST_MIRRORS = ["http://www.cs.toronto.edu/~nitish/unsupervised_video/"]

FALLBACK_SPLIT = 8000  # test digits [0, 8000) train, [8000, 10000) held out
IDX_IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions

# Independent random streams, so that the training, validation and test sequences of
# one seed never coincide.
_STREAM_TRAIN, _STREAM_VAL, _STREAM_TEST = 0, 1, 2


# -----------------------------------------------------------------------------
# reading MNIST

def load_mnist(path):
    """Read an IDX image file, gzipped or raw, into a uint8 array (N, rows, cols).

    Raises UsageError, naming the file and the fix, for a truncated, corrupt or
    non-image file.
    """
    path = Path(path)
    redo = "delete it and re-run to download it again"
    check(not path.is_dir(), f"{path} is a directory, not an MNIST images file")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic bytes
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise UsageError(f"{path}: not a readable gzip file, truncated or "
                             f"corrupt ({e}); {redo}") from None
    if len(raw) < 16:
        raise UsageError(f"{path}: {len(raw)} bytes is too short for an IDX header "
                         f"(16 bytes); {redo}")
    magic, n, rows, cols = struct.unpack(">4i", raw[:16])  # big-endian, per the IDX spec
    if magic != IDX_IMAGES_MAGIC:
        raise UsageError(f"{path}: IDX magic number {magic}, expected "
                         f"{IDX_IMAGES_MAGIC} (an images file, e.g. {TEST_IMAGES}, not "
                         f"labels); {redo}")
    expected = n * rows * cols
    if len(raw) - 16 != expected:
        raise UsageError(f"{path}: header says {n}x{rows}x{cols} = {expected} pixel "
                         f"bytes but the file holds {len(raw) - 16}; {redo}")
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows, cols)


# -----------------------------------------------------------------------------
# downloading

def _md5(path, chunk=1 << 20):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class _WrongMd5(Exception):
    pass


def _fetch(url, out, md5, timeout, desc):
    """Stream `url` into the open file `out`; raise _WrongMd5 unless its md5 is `md5`."""
    h = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as r:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
            for block in iter(lambda: r.read(1 << 16), b""):
                out.write(block)
                h.update(block)
                bar.update(len(block))
    if h.hexdigest() != md5:
        raise _WrongMd5(f"md5 {h.hexdigest()}, expected {md5}")


def download_file(filename, root, md5, mirrors, *, timeout=30):
    """Return `root/filename`, downloading it from the first mirror that works.

    A file already there with the right md5 is kept. A download streams into a temp
    file in `root` and only becomes `root/filename` once its md5 is right, so a failed
    or interrupted download leaves nothing behind. Raises UsageError listing the
    URLs tried when no mirror gives the right file.
    """
    root = Path(root)
    final = root / filename
    if final.exists() and _md5(final) == md5:
        return final
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + filename
        try:
            atomic_write(final, lambda out: _fetch(url, out, md5, timeout, filename))
            return final
        except _WrongMd5 as e:
            failures.append(f"{url} ({e})")
        except (urllib.error.URLError, OSError, ValueError) as e:  # timeouts are OSErrors
            # An HTTPError says its status only in str(); a URLError says why in .reason.
            reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
            failures.append(f"{url} ({reason})")
    stale = f"; the {final.name} there has the wrong md5" if final.exists() else ""
    raise UsageError(f"could not download {filename}: tried "
                     f"{'; '.join(failures) or 'no mirrors'}{stale}; download it by "
                     f"hand and put it at {final} (md5 {md5})")


# -----------------------------------------------------------------------------
# digit pools

_POOLS = {}  # (resolved root, train file present) -> (train_digits, heldout_digits)
_FALLBACK_WARNED = False


def digit_pools(root, *, download=True):
    """Return the (train_digits, heldout_digits) MNIST pools, each uint8 (N, 28, 28).

    With `train-images-idx3-ubyte.gz` in `root`: all 60,000 training digits, and the
    10,000 test digits held out. With only the test file: test digits 0-7,999 and
    8,000-9,999 (warns once per process). `download=True` first tries to fetch any
    missing file. Pools are cached per root, so building many datasets reads the
    files once.
    """
    global _FALLBACK_WARNED
    root = Path(root).resolve()
    train_path, test_path = root / TRAIN_IMAGES, root / TEST_IMAGES
    key = (root, train_path.exists())
    if key in _POOLS:
        return _POOLS[key]

    failed = []
    if download:
        for name in (TEST_IMAGES, TRAIN_IMAGES):
            if not (root / name).exists():
                try:
                    download_file(name, root, MNIST_FILES[name], MNIST_MIRRORS)
                except (UsageError, OSError) as e:  # OSError: e.g. a read-only root
                    failed.append(str(e))

    if train_path.exists():
        if not test_path.exists():
            raise FileNotFoundError(
                f"{root} has {TRAIN_IMAGES} but not {TEST_IMAGES}, whose digits make "
                f"the held-out sequences; put it there (md5 {MNIST_FILES[TEST_IMAGES]}) "
                f"or run `python -m data.mm download --root {root}`")
        pools = load_mnist(train_path), load_mnist(test_path)
    elif test_path.exists():
        test = load_mnist(test_path)
        if len(test) <= FALLBACK_SPLIT:
            raise UsageError(f"{test_path}: {len(test)} digits, too few to split at "
                             f"{FALLBACK_SPLIT}; replace it with the 10,000-digit file")
        if not _FALLBACK_WARNED:
            _FALLBACK_WARNED = True
            warnings.warn(
                f"{TRAIN_IMAGES} is not in {root}: training on MNIST test digits "
                f"0-{FALLBACK_SPLIT - 1} and holding out the rest, so numbers can't be "
                f"compared with published ones", stacklevel=2)
        pools = test[:FALLBACK_SPLIT], test[FALLBACK_SPLIT:]
    else:
        why = f" ({' / '.join(failed)})" if failed else ""
        raise FileNotFoundError(
            f"no MNIST digits in {root}: it needs {TEST_IMAGES} and ideally "
            f"{TRAIN_IMAGES}{why}; run `python -m data.mm download --root {root}` or "
            f"copy them there from {MNIST_MIRRORS[0]}")
    _POOLS[(root, train_path.exists())] = pools
    return pools


# -----------------------------------------------------------------------------
# generation (Srivastava et al. 2015, following the authors' released code)

def random_trajectory(rng, n_frames, step_length=0.1):
    """Positions (T, 2) as (y, x) in the unit square of one digit bouncing around.

    A random start and direction; each frame steps `step_length` along the velocity
    and, where that crosses a border, clamps to it and flips that velocity component.
    As in the authors' code, frame 0 is already one step from the start.
    """
    y, x, theta = (float(v) for v in rng.random(3))
    vy = math.sin(2 * math.pi * theta) * step_length
    vx = math.cos(2 * math.pi * theta) * step_length
    out = []
    for _ in range(n_frames):  # 20 scalar steps beat numpy's per-call overhead
        y += vy
        x += vx
        if y <= 0.0:
            y, vy = 0.0, abs(vy)
        elif y >= 1.0:
            y, vy = 1.0, -abs(vy)
        if x <= 0.0:
            x, vx = 0.0, abs(vx)
        elif x >= 1.0:
            x, vx = 1.0, -abs(vx)
        out.append((y, x))
    return np.array(out)


def render_sequence(digits, positions, image_size=64):
    """Draw digits (K, d, d) uint8 at positions (K, T, 2) in [0, 1] -> (T, H, W) uint8.

    A position scales to the digit's top-left pixel by (image_size - d), truncated as
    in the authors' code. Overlapping digits combine by max (Srivastava et al. 2015).
    """
    digit_size = digits.shape[-1]
    corners = (np.asarray(positions) * (image_size - digit_size)).astype(np.intp)  # (K, T, 2)
    n_digits, n_frames = corners.shape[:2]
    # One layer per digit, then a single max over layers: plain slice copies are
    # cheaper than an np.maximum per digit and frame.
    layers = np.zeros((n_digits, n_frames, image_size, image_size), np.uint8)  # (K, T, H, W)
    for layer, digit, track in zip(layers, digits, corners.tolist()):
        for frame, (top, left) in zip(layer, track):
            frame[top:top + digit_size, left:left + digit_size] = digit
    return layers.max(axis=0)  # (T, H, W)


def generate_sequence(rng, digits, n_frames, num_digits, image_size=64, digit_size=28,
                      step_length=0.1):
    """One Moving MNIST sequence (T, H, W) uint8 from a pool `digits` (N, d, d) uint8.

    Draws `num_digits` digits from the pool (with replacement), then one trajectory
    each, all from `rng` (a np.random.Generator).
    """
    if digits.shape[1:] != (digit_size, digit_size):
        raise UsageError(f"digits are {digits.shape[1]}x{digits.shape[2]} but "
                         f"digit_size is {digit_size}")
    chosen = digits[rng.integers(len(digits), size=num_digits)]  # (K, d, d)
    positions = [random_trajectory(rng, n_frames, step_length) for _ in range(num_digits)]
    return render_sequence(chosen, np.reshape(positions, (num_digits, n_frames, 2)),
                           image_size)


def _sample_rng(seed, stream, rank, epoch, index):
    # SeedSequence mixes all five numbers, so neighbouring seeds, epochs and indices give
    # unrelated sequences. `rank` is always 0 now (main.py shards by index, see its
    # EpochSampler); it stays in the key so that every sequence is the one earlier versions drew.
    return np.random.default_rng(np.random.SeedSequence([seed, stream, rank, epoch, index]))


class MovingMNIST(Dataset):
    """Moving MNIST sequences generated on the fly (Srivastava et al. 2015).

    Item i is `(inputs, targets)`, float32 in [0, 1], shapes (T_in, 1, H, W) and
    (T_out, 1, H, W): one sequence of T_in + T_out frames, split in two.

    A sample is a pure function of (seed, epoch, index, is_train):
    - `is_train=True` draws training digits and fresh sequences every epoch (call
      `set_epoch`).
    - `is_train=False` draws held-out digits and ignores the epoch: the same fixed
      validation set every epoch.
    Under torchrun every process holds the same dataset; main.py gives each its share of
    the indices.

    Epochs and workers: `dataset[(epoch, i)]` is sequence i of that epoch, whatever
    `set_epoch` said, so a sampler that yields (epoch, index) pairs (main.py's) works
    with persistent DataLoader workers, which keep their own copy of the dataset.
    `dataset[i]` uses the epoch of the last `set_epoch`.

    `num_objects` (the original repo's name for what main.py calls --num-digits) is a
    list of digit counts, one picked per sequence, e.g. [2] or [1, 2, 3]. `digits`
    (N, 28, 28) uint8 replaces the MNIST pools, and `root` is then not read.
    """

    def __init__(self, root, is_train, n_frames_input, n_frames_output, num_objects, *,
                 seed=0, length=10000, image_size=64, digit_size=28, step_length=0.1,
                 download=True, digits=None):
        super().__init__()
        if isinstance(num_objects, int):
            num_objects = [num_objects]
        if not num_objects or any(int(k) < 1 for k in num_objects):
            raise UsageError(f"num_objects must be a non-empty list of digit counts >= 1, "
                             f"got {num_objects}")
        if n_frames_input < 1 or n_frames_output < 1:
            raise UsageError(f"need at least one input and one output frame, got "
                             f"{n_frames_input} and {n_frames_output}")
        if image_size < digit_size:
            raise UsageError(f"image_size {image_size} is smaller than digit_size "
                             f"{digit_size}")
        if seed < 0:
            raise UsageError(f"seed must be >= 0, got {seed}")
        if digits is None:
            train_digits, heldout_digits = digit_pools(root, download=download)
            digits = train_digits if is_train else heldout_digits
        digits = np.asarray(digits)
        if digits.dtype != np.uint8 or digits.ndim != 3 or len(digits) == 0 \
                or digits.shape[1:] != (digit_size, digit_size):
            raise UsageError(f"digits must be uint8 (N, {digit_size}, {digit_size}) with "
                             f"N >= 1, got {digits.dtype} {digits.shape}")
        self.digits = digits
        self.is_train = is_train
        self.n_frames_input = n_frames_input
        self.n_frames_output = n_frames_output
        self.num_objects = [int(k) for k in num_objects]
        self.seed = seed
        self.length = length
        self.image_size = image_size
        self.digit_size = digit_size
        self.step_length = step_length
        self.epoch = 0

    def set_epoch(self, epoch):
        """Select the epoch's sequences (training only; see the class docstring)."""
        self.epoch = int(epoch)

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} sequences")
        if self.is_train:
            rng = _sample_rng(self.seed, _STREAM_TRAIN, 0, epoch, index)
        else:
            rng = _sample_rng(self.seed, _STREAM_VAL, 0, 0, index)
        num_digits = self.num_objects[rng.integers(len(self.num_objects))]
        n_frames = self.n_frames_input + self.n_frames_output
        seq = generate_sequence(rng, self.digits, n_frames, num_digits, self.image_size,
                                self.digit_size, self.step_length)  # (T, H, W) uint8
        frames = torch.from_numpy(seq).unsqueeze(1).float().div_(255)  # (T, 1, H, W)
        return frames[:self.n_frames_input], frames[self.n_frames_input:]


# -----------------------------------------------------------------------------
# fixed test sets

def load_test_set(path):
    """Read a Moving MNIST test set in the `mnist_test_seq.npy` layout (T, N, H, W) uint8.

    The array is memory-mapped read-only: the standard file is 820 MB.
    """
    path = Path(path)
    arr = load_npy(path)
    if arr.ndim != 4 or arr.dtype != np.uint8:
        raise UsageError(f"{path}: found {arr.dtype} {arr.shape}, expected uint8 "
                         f"(T, N, H, W) like mnist_test_seq.npy (20, 10000, 64, 64)")
    return arr


def make_test_set(root, num, num_digits=2, seed=0, n_frames=20, image_size=64, *,
                  download=True):
    """A fixed test set (T, N, H, W) uint8 from the held-out digits, deterministic in seed.

    `num_digits` is a digit count or a list of them; with several, each sequence draws
    its count from the list, as training does. Its sequences come from a different
    random stream than MovingMNIST's validation set, so the two never share a sequence.
    Note that the held-out pool (and thus the set) differs with and without the MNIST
    training file in `root`.
    """
    counts = [num_digits] if isinstance(num_digits, int) else [int(k) for k in num_digits]
    check(num >= 1 and counts and min(counts) >= 1,
          f"a test set needs num >= 1 sequences of >= 1 digits, got {num} and {num_digits}")
    _, heldout = digit_pools(root, download=download)
    out = np.empty((n_frames, num, image_size, image_size), np.uint8)
    for i in range(num):
        rng = _sample_rng(seed, _STREAM_TEST, 0, 0, i)
        # One count draws nothing, so sets made before counts could be lists are unchanged.
        k = counts[rng.integers(len(counts))] if len(counts) > 1 else counts[0]
        out[:, i] = generate_sequence(rng, heldout, n_frames, k, image_size)
    return out


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = ArgumentParser(prog="python -m data.mm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="download the MNIST image files (and optionally "
                       "the fixed Moving MNIST test set)")
    p.add_argument("--root", default=DEFAULT_DATA_ROOT, metavar="DIR",
                   help=f"folder for the files (default: {DEFAULT_DATA_ROOT})")
    p.add_argument("--moving-mnist-test", action="store_true",
                   help=f"also download {MOVING_MNIST_TEST[0]} (820 MB) (default: off)")

    p = sub.add_parser("make-test-set", help="write a fixed test set (T, N, H, W) uint8 "
                       "from held-out digits")
    p.add_argument("--root", default=DEFAULT_DATA_ROOT, metavar="DIR",
                   help=f"folder with the MNIST files (default: {DEFAULT_DATA_ROOT})")
    p.add_argument("--out", required=True, metavar="FILE", help="output .npy file")
    p.add_argument("--num", type=int, default=10000, metavar="N",
                   help="number of sequences (default: 10000)")
    p.add_argument("--num-digits", type=int, nargs="+", default=[2], metavar="K",
                   help="digits per sequence; with several, each sequence draws one "
                        "(default: 2)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    p.add_argument("--n-frames", type=int, default=20, metavar="T",
                   help="frames per sequence (default: 20)")
    p.add_argument("--image-size", type=int, default=64, metavar="PX",
                   help="canvas height and width (default: 64)")
    p.add_argument("--no-download", action="store_true",
                   help="use only the files already in --root (default: download missing ones)")
    args = parser.parse_args(argv)

    if args.command == "download":
        files = [(name, md5, MNIST_MIRRORS) for name, md5 in MNIST_FILES.items()]
        if args.moving_mnist_test:
            files.append((*MOVING_MNIST_TEST, MOVING_MNIST_MIRRORS))
        failed = []
        for name, md5, mirrors in files:
            try:
                print(download_file(name, args.root, md5, mirrors))
            except UsageError as e:
                failed.append(str(e))
        check(not failed, " | ".join(failed))
        return

    out = Path(args.out)
    check(args.num >= 1, f"--num must be >= 1, got {args.num}")
    check(min(args.num_digits) >= 1, f"--num-digits must be >= 1, got {args.num_digits}")
    check(args.n_frames >= 1, f"--n-frames must be >= 1, got {args.n_frames}")
    check(args.image_size >= 28, f"--image-size must be >= 28, the digits' size; got {args.image_size}")
    check(args.seed >= 0, f"--seed must be >= 0, got {args.seed}")
    check(not out.is_dir(), f"--out {out} is a directory; name a .npy file in it")
    check(out.suffix == ".npy", f"--out {out} must end in .npy")
    check_memory(args.num * args.n_frames * args.image_size ** 2,
                 f"--num {args.num} sequences of --n-frames {args.n_frames} at --image-size "
                 f"{args.image_size}", "lower --num or --image-size")
    arr = make_test_set(args.root, args.num, args.num_digits, args.seed, args.n_frames,
                        args.image_size, download=not args.no_download)
    atomic_write(out, lambda f: np.save(f, arr))
    pool = ("all MNIST test digits" if (Path(args.root) / TRAIN_IMAGES).exists()
            else f"MNIST test digits {FALLBACK_SPLIT}-9999")
    print(f"wrote {out}: {arr.dtype} {arr.shape} (T, N, H, W) from {pool}, "
          f"{args.num_digits} digits, seed {args.seed}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
