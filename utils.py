"""Helpers shared by main.py, evaluate.py and tools/: errors, metrics, the evaluation loop,
the training step, pictures, files, devices.

Nothing here runs at import time. Video tensors are (B, T, C, H, W) with values in [0, 1].
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from skimage.metrics import structural_similarity

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


def run_cli(main, argv=None) -> int:
    """Run a CLI's main(argv): user errors become one `error: ...` line and exit code 1."""
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


# ---------------------------------------------------------------------------------------
# Metrics (docs/metrics.md)
# ---------------------------------------------------------------------------------------

METRIC_NAMES = ("mse", "mae", "ssim", "psnr", "ssim_openstl")  # rows of MetricAccumulator.totals

# PSNR of a perfect frame is infinite; clamping its MSE caps it at 100 dB, so one
# exact frame cannot turn a whole test-set average into inf.
PSNR_MIN_MSE = 1e-10

SSIM_WINDOW = 7  # scikit-image's default window, which published SSIM figures use


class MetricAccumulator:
    """Running per-frame sums of the field's metrics (docs/metrics.md has the sources).

    For each predicted frame (values in [0, 1]):
      - mse, mae: SUM over pixels and channels of squared / absolute error, on raw
        (unclipped) predictions, as OpenSTL computes them.
      - ssim: skimage.metrics.structural_similarity(pred, true, data_range=1.0) with its
        default 7x7 window, on predictions clipped to [0, 1]: PredRNN's convention.
      - ssim_openstl: the same on float32 frames with data_range=2.0: what OpenSTL's table
        reports (scikit-image <= 0.19 took the range of a float image as (-1, 1)).
      - psnr: 10 * log10(1 / per-pixel mean squared error), on clipped predictions; the
        MSE is clamped to PSNR_MIN_MSE, so a perfect frame scores 100 dB.
    compute() averages each over frames and sequences.

    State is `totals`, a float64 CPU tensor (len(METRIC_NAMES), T) of sums over sequences,
    and `count`, the number of sequences. Both are plain sums, so under torch.distributed
    `as_tensor()` -> all_reduce(SUM) -> `load_tensor()` gives the single-process result
    (up to float64 rounding from the summation order).
    """

    def __init__(self, n_frames):
        if n_frames < 1:
            raise ValueError(f"MetricAccumulator needs n_frames >= 1, got {n_frames}")
        self.n_frames = int(n_frames)
        self.reset()

    def reset(self):
        self.totals = torch.zeros(len(METRIC_NAMES), self.n_frames, dtype=torch.float64)
        self.count = 0

    @torch.no_grad()
    def update(self, pred, target):
        """Add a batch. pred, target: (B, T, C, H, W) tensors on any device and dtype, T == n_frames."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.dim() != 5:
            raise ValueError(f"metrics expect (B, T, C, H, W) tensors, got shape {tuple(pred.shape)}")
        b, t, c, h, w = pred.shape
        if t != self.n_frames:
            raise ValueError(f"MetricAccumulator was built for {self.n_frames} frames but got {t}")
        check(min(h, w) >= SSIM_WINDOW,
              f"SSIM uses a {SSIM_WINDOW}x{SSIM_WINDOW} window; frames of {h}x{w} are too small")
        pred = pred.detach().to(torch.float64)
        target = target.detach().to(pred.device, torch.float64)
        lo, hi = target.min().item(), target.max().item()
        check(lo >= -1e-6 and hi <= 1 + 1e-6,
              f"targets must lie in [0, 1] but span [{lo:.4g}, {hi:.4g}]; divide uint8 frames by 255")

        err = pred - target
        mse = err.square().sum(dim=(2, 3, 4))  # (B, T)
        mae = err.abs().sum(dim=(2, 3, 4))  # (B, T)

        clipped = pred.clamp(0.0, 1.0)
        pixel_mse = (clipped - target).square().mean(dim=(2, 3, 4)).clamp_min(PSNR_MIN_MSE)  # (B, T)
        psnr = 10.0 * torch.log10(1.0 / pixel_mse)

        clipped_np = clipped.cpu().numpy()
        target_np = target.cpu().numpy()
        clipped_32, target_32 = clipped_np.astype(np.float32), target_np.astype(np.float32)
        ssim = torch.empty(2, b, t, dtype=torch.float64)
        for i in range(b):
            for j in range(t):
                ssim[0, i, j] = _frame_ssim(clipped_np[i, j], target_np[i, j], 1.0)
                ssim[1, i, j] = _frame_ssim(clipped_32[i, j], target_32[i, j], 2.0)

        per_frame = torch.stack([mse.sum(0).cpu(), mae.sum(0).cpu(), ssim[0].sum(0),
                                 psnr.sum(0).cpu(), ssim[1].sum(0)])
        self.totals += per_frame  # (len(METRIC_NAMES), T)
        self.count += b

    def as_tensor(self):
        """1-D float64 tensor (len(METRIC_NAMES) * T + 1,): totals row by row, then count."""
        return torch.cat([self.totals.flatten(), torch.tensor([float(self.count)], dtype=torch.float64)])

    def load_tensor(self, tensor):
        """Restore the state from an `as_tensor()` layout, e.g. after all_reduce(SUM)."""
        tensor = tensor.detach().to("cpu", torch.float64).flatten()
        expected = len(METRIC_NAMES) * self.n_frames + 1
        if tensor.numel() != expected:
            raise ValueError(f"expected a tensor of {expected} values for {self.n_frames} frames, "
                             f"got {tensor.numel()}")
        self.totals = tensor[:-1].reshape(len(METRIC_NAMES), self.n_frames).clone()
        self.count = int(round(tensor[-1].item()))

    def compute(self):
        """Averages: {name: float for METRIC_NAMES, "per_frame_mse": list of T floats}."""
        if self.count == 0:
            raise ValueError("no sequences were added to MetricAccumulator; call update() first")
        per_frame = self.totals / self.count  # (len(METRIC_NAMES), T)
        result = {name: per_frame[k].mean().item() for k, name in enumerate(METRIC_NAMES)}
        result["per_frame_mse"] = per_frame[0].tolist()
        return result


def _frame_ssim(pred, true, data_range):
    """SSIM of one (C, H, W) frame pair in [0, 1], computed in the arrays' float dtype."""
    if pred.shape[0] == 1:
        return float(structural_similarity(pred[0], true[0], data_range=data_range))
    return float(structural_similarity(pred, true, data_range=data_range, channel_axis=0))


def copy_last_frame(inputs, n_frames_output):
    """Baseline that repeats the last input frame. inputs (B, T_in, C, H, W) -> (B, T_out, C, H, W)."""
    return inputs[:, -1:].repeat(1, n_frames_output, 1, 1, 1)


# ---------------------------------------------------------------------------------------
# Evaluation: one loop for validation (main.py) and testing (evaluate.py)
# ---------------------------------------------------------------------------------------


@dataclass
class Scores:
    metrics: dict            # name -> MetricAccumulator: "model" and each baseline
    loss_sums: torch.Tensor  # float64 (2,): the model's summed squared error, pixel count
    first_batch: tuple       # (inputs, targets, predictions) of the first batch, on the CPU
    model_seconds: float     # time in the model's forward passes, device synchronised
    sequences: int

    @property
    def loss(self) -> float:
        """Per-pixel MSE, the training loss."""
        return (self.loss_sums[0] / self.loss_sums[1]).item()


@torch.no_grad()
def score(model, loader, device, amp_ctx, frames_output: int, baselines=None) -> Scores:
    """Predict every batch of `loader` and score the model and `baselines`
    ({name: fn(inputs, frames_output) -> predictions}) with MetricAccumulator."""
    baselines = baselines or {}
    metrics = {name: MetricAccumulator(frames_output) for name in ("model", *baselines)}
    loss_sums = torch.zeros(2, dtype=torch.float64, device=device)
    first, seconds, sequences = None, 0.0, 0
    was_training = model.training
    model.eval()
    for inputs, targets in loader:
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        t0 = time.perf_counter()
        with amp_ctx:
            pred = model(inputs, frames_output=frames_output)
        pred = pred.float()
        synchronize(device)
        seconds += time.perf_counter() - t0
        loss_sums[0] += F.mse_loss(pred, targets, reduction="sum").double()
        loss_sums[1] += targets.numel()
        metrics["model"].update(pred, targets)
        for name, baseline in baselines.items():
            metrics[name].update(baseline(inputs, frames_output), targets)
        sequences += len(inputs)
        if first is None:
            first = (inputs.cpu(), targets.cpu(), pred.cpu())
    model.train(was_training)
    return Scores(metrics, loss_sums, first, seconds, sequences)


# ---------------------------------------------------------------------------------------
# Training step and precision
# ---------------------------------------------------------------------------------------

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("auto", "none", "bf16", "fp16")
LOSSES = ("mse", "mse+l1")


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp auto is bf16 on CUDA GPUs that support it and fp32 ("none") elsewhere: CPUs
    without AVX512-BF16 or AMX run bf16 slowly, so there it stays opt-in."""
    check(amp in AMP_CHOICES, f"--amp {amp!r}: use one of {', '.join(AMP_CHOICES)}")
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    check(amp != "fp16" or device.type == "cuda",
          f"--amp fp16 needs a CUDA device, got {device.type}; use --amp bf16")
    return amp


def autocast_context(device: torch.device, amp: str):
    """torch.autocast for a resolved --amp (bf16, fp16), a no-op for none."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[resolve_amp(amp, device)])


def loss_fn(pred: torch.Tensor, targets: torch.Tensor, loss: str = "mse") -> torch.Tensor:
    """Per-pixel MSE, plus per-pixel L1 for "mse+l1" (their sum, as several papers train)."""
    pred = pred.float()
    value = F.mse_loss(pred, targets)  # the mean over pixels: no second division by B
    if loss == "mse+l1":
        value = value + F.l1_loss(pred, targets)
    return value


def train_step(model, optimizer, scaler, inputs, targets, amp_ctx, clip: float = 10.0,
               loss: str = "mse") -> torch.Tensor:
    """One optimisation step on a batch (B, T_in, C, H, W) -> (B, T_out, C, H, W).

    Returns the loss as a detached tensor: the caller decides when to sync with .item().
    """
    with amp_ctx:
        pred = model(inputs, frames_output=targets.shape[1])
    value = loss_fn(pred, targets, loss)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(value).backward()
    scaler.unscale_(optimizer)
    if clip != float("inf"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
    return value.detach()


# ---------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------

BACKGROUND = 224  # light gray between frames, distinct from MNIST's black background
LABEL_BACKGROUND = 255
ROW_LABELS = ("input", "truth", "prediction")


def _as_video(x, what):
    """Tensor or array (B, T, C, H, W) -> float32 numpy array clipped to [0, 1]."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 5:
        raise ValueError(f"{what} must be (B, T, C, H, W), got shape {x.shape}")
    if x.shape[2] not in (1, 3):
        raise ValueError(f"{what} has {x.shape[2]} channels; pictures support 1 (gray) or 3 (RGB)")
    return np.clip(x, 0.0, 1.0)


def _check_videos(inputs, targets, preds):
    inputs, targets, preds = (_as_video(inputs, "inputs"), _as_video(targets, "targets"),
                              _as_video(preds, "preds"))
    if targets.shape != preds.shape:
        raise ValueError(f"targets {targets.shape} and preds {preds.shape} must have the same shape")
    if inputs.shape[0] != targets.shape[0] or inputs.shape[2:] != targets.shape[2:]:
        raise ValueError(f"inputs {inputs.shape} and targets {targets.shape} differ in batch, "
                         "channels or frame size")
    return inputs, targets, preds


def _to_uint8(frame):
    """(C, H, W) float in [0, 1] -> (H, W) or (H, W, 3) uint8."""
    frame = np.rint(frame * 255.0).astype(np.uint8)
    return frame[0] if frame.shape[0] == 1 else frame.transpose(1, 2, 0)


def _grid(inputs, targets, preds, max_sequences, pad):
    """Build the picture of prediction_grid and the (top, bottom, label) span of every row."""
    if max_sequences < 1 or pad < 0:
        raise ValueError(f"need max_sequences >= 1 and pad >= 0, got {max_sequences} and {pad}")
    inputs, targets, preds = _check_videos(inputs, targets, preds)
    n = min(inputs.shape[0], max_sequences)
    c, h, w = inputs.shape[2:]
    n_cols = max(inputs.shape[1], targets.shape[1])
    seq_gap = 3 * pad  # wider than the gap between rows, so sequences read as groups

    height = pad + n * 3 * (h + pad) + (n - 1) * (seq_gap - pad)
    width = pad + n_cols * (w + pad)
    grid = np.full((height, width) + ((3,) if c == 3 else ()), BACKGROUND, dtype=np.uint8)
    spans = []
    y = pad
    for i in range(n):
        for label, video in zip(ROW_LABELS, (inputs, targets, preds)):
            for j in range(video.shape[1]):
                x = pad + j * (w + pad)
                grid[y:y + h, x:x + w] = _to_uint8(video[i, j])
            spans.append((y, y + h, label))
            y += h + pad
        y += seq_gap - pad
    return grid, spans


def prediction_grid(inputs, targets, preds, *, max_sequences=4, pad=2):
    """Picture of up to `max_sequences` sequences, three rows each: input, truth, prediction.

    inputs (B, T_in, C, H, W); targets and preds (B, T_out, C, H, W); tensors or arrays
    in [0, 1] (preds are clipped), C = 1 or 3. Row j holds frames left to right; the
    shorter of T_in and T_out is padded with background. Returns uint8 (H_img, W_img)
    for C = 1 or (H_img, W_img, 3) for C = 3.
    """
    return _grid(inputs, targets, preds, max_sequences, pad)[0]


def _text_size(draw, text):
    left, top, right, bottom = draw.textbbox((0, 0), text)
    return right - left, bottom - top


def _upscale(image, scale):
    if scale < 1 or int(scale) != scale:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    return np.repeat(np.repeat(image, int(scale), axis=0), int(scale), axis=1)


def save_prediction_figure(path, inputs, targets, preds, *, max_sequences=4, pad=2, scale=2):
    """Write prediction_grid as a PNG, enlarged `scale` times (nearest neighbour), with row labels.

    Shapes as in prediction_grid. Parent directories are created; the write is atomic.
    """
    grid, spans = _grid(inputs, targets, preds, max_sequences, pad)
    grid = _upscale(grid, scale)
    mode = "RGB" if grid.ndim == 3 else "L"
    ink = (0, 0, 0) if mode == "RGB" else 0
    paper = (LABEL_BACKGROUND,) * 3 if mode == "RGB" else LABEL_BACKGROUND

    draw = ImageDraw.Draw(Image.new(mode, (1, 1)))
    margin = 6
    label_width = max(_text_size(draw, label)[0] for label in ROW_LABELS) + 2 * margin
    figure = Image.new(mode, (label_width + grid.shape[1], grid.shape[0]), paper)
    figure.paste(Image.fromarray(grid), (label_width, 0))
    draw = ImageDraw.Draw(figure)
    for top, bottom, label in spans:
        _, text_h = _text_size(draw, label)
        y = (top + bottom) * scale // 2 - text_h // 2
        draw.text((margin, y), label, fill=ink)
    atomic_write(path, lambda f: figure.save(f, format="PNG"))


def save_prediction_gif(path, inputs, targets, preds, *, max_sequences=4, duration_ms=200, pad=2, scale=2):
    """Write an animated GIF with one pair [input-or-truth | prediction] per sequence.

    inputs (B, T_in, C, H, W); targets and preds (B, T_out, C, H, W). The GIF has
    T_in + T_out frames: first each input frame beside a blank, then each true frame
    beside its prediction (clipped to [0, 1]). A caption names the phase and frame number.
    Parent directories are created; the write is atomic.
    """
    inputs, targets, preds = _check_videos(inputs, targets, preds)
    n = min(inputs.shape[0], max_sequences)
    t_in, t_out = inputs.shape[1], targets.shape[1]
    c, h, w = inputs.shape[2:]
    mode = "RGB" if c == 3 else "L"
    ink = (0, 0, 0) if mode == "RGB" else 0
    paper = (LABEL_BACKGROUND,) * 3 if mode == "RGB" else LABEL_BACKGROUND
    seq_gap = 3 * pad * scale
    cell_w, cell_h, pad_s = w * scale, h * scale, pad * scale

    captions = ([f"input {k + 1}/{t_in}" for k in range(t_in)]
                + [f"truth | prediction {k + 1}/{t_out}" for k in range(t_out)])
    draw = ImageDraw.Draw(Image.new(mode, (1, 1)))
    text_w = max(_text_size(draw, s)[0] for s in captions)
    text_h = max(_text_size(draw, s)[1] for s in captions)
    header = text_h + 6
    content_w = n * (2 * cell_w + pad_s) + (n - 1) * seq_gap + 2 * pad_s
    width = max(content_w, text_w + 2 * pad_s + 4)
    height = header + cell_h + pad_s

    blank = np.full((c, h, w), BACKGROUND / 255.0, dtype=np.float32)
    frames = []
    for k, caption in enumerate(captions):
        image = Image.new(mode, (width, height), paper)
        for i in range(n):
            if k < t_in:
                left, right = inputs[i, k], blank
            else:
                left, right = targets[i, k - t_in], preds[i, k - t_in]
            x = pad_s + i * (2 * cell_w + pad_s + seq_gap)
            for offset, frame in ((0, left), (cell_w + pad_s, right)):
                cell = Image.fromarray(_upscale(_to_uint8(frame), scale))
                image.paste(cell, (x + offset, header))
        ImageDraw.Draw(image).text((pad_s + 2, 3), caption, fill=ink)
        frames.append(image)

    def write(f):
        # Pillow merges identical consecutive frames; the frame number in the caption
        # keeps every frame distinct, so the GIF always has T_in + T_out frames.
        frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                       duration=duration_ms, loop=0)

    atomic_write(path, write)


# ---------------------------------------------------------------------------------------
# Files: atomic writes and checkpoints
# ---------------------------------------------------------------------------------------

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


def atomic_save(obj, path):
    """torch.save(obj, path) through a temporary file, so `path` is never left half-written."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _first_line(err):
    text = str(err)
    # weights_only failures open with a generic paragraph; the cause is on this line
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split(". Please", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


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
        raise UsageError(f"{prefix}: torch.load failed with {_first_line(err)}") from err
    if not isinstance(checkpoint, dict):
        raise UsageError(f"{prefix}: expected a dict, found {type(checkpoint).__name__}")
    missing = [key for key in ("model", "config") if key not in checkpoint]
    if missing:
        raise UsageError(f"{prefix}: the dict lacks {missing} (keys: {sorted(map(str, checkpoint))})")
    return checkpoint


# ---------------------------------------------------------------------------------------
# Device and seeding
# ---------------------------------------------------------------------------------------


def _mps_available():
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def pick_device(name="auto"):
    """Return torch.device: "auto" picks cuda, then mps, then cpu; explicit names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise UsageError(f"--device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cpu":
        return device
    if device.type == "mps":
        if not _mps_available():
            raise UsageError(f"--device {name} requested but torch.backends.mps.is_available() is False")
        return device
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, ...
    if backend is None or not hasattr(backend, "is_available"):
        raise UsageError(f"--device {name} is not supported; use auto, cpu, cuda, cuda:N or mps")
    if not backend.is_available():
        raise UsageError(f"--device {name} requested but torch.{device.type}.is_available() is False")
    if device.index is not None and device.index >= backend.device_count():
        raise UsageError(f"--device {name} requested but only {backend.device_count()} "
                         f"{device.type} device(s) are visible")
    return device


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


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------

METRIC_COLUMNS = [("model", "model", "{}"), ("mse", "mse", "{:.2f}"), ("mae", "mae", "{:.2f}"),
                  ("ssim", "ssim", "{:.4f}"), ("psnr", "psnr", "{:.2f}"),
                  ("ssim_openstl", "ssim_openstl", "{:.4f}")]


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


def format_metrics_table(results: dict) -> str:
    """{name: metrics dict} (e.g. evaluate.py's "model" and "copy_last_baseline") as a table."""
    return format_table([{**metrics, "model": name} for name, metrics in results.items()],
                        METRIC_COLUMNS)


# ---------------------------------------------------------------------------------------
# Process-wide speed settings
# ---------------------------------------------------------------------------------------


def configure_process(device: torch.device, *, keep_freed: bool = True) -> torch.memory_format:
    """Process-wide speed settings for `device`, shared by main.py, evaluate.py and
    tools/bench.py (docs/speed.md has the measurements). Returns the memory format for the
    model and its activations."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times and keeps its fastest kernels
    if device.type == "cpu":
        if keep_freed:
            keep_freed_memory()  # no page faults on every step's big tensors: 4-8% faster steps
        return torch.channels_last  # oneDNN's convolutions: 2-3% faster end to end
    return torch.contiguous_format  # cuda, mps: channels_last is unmeasured (tools/gpu_check.sh)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it (Linux, CPU runs).

    By default every tensor over 32 MB is a fresh mmap, returned to the OS when freed, so
    each training step page-faults its big activations in again: about 2 GB of faults a
    step for convlstm, 4-8% of the step. M_MMAP_MAX = 0 serves all sizes from the heap
    and a high M_TRIM_THRESHOLD keeps the freed heap, so steps after the first reuse warm
    pages. Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 2**31 - 1))  # M_MMAP_MAX, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock timings are true (cuda, mps)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
