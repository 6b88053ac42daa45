"""Helpers shared by main.py and evaluate.py: metrics, pictures, checkpoints, devices.

Nothing here runs at import time. Video tensors are (B, T, C, H, W) with values in [0, 1].
"""

import ctypes
import os
import uuid

import numpy as np
import torch
from PIL import Image, ImageDraw
from skimage.metrics import structural_similarity

# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------

METRIC_NAMES = ("mse", "mae", "ssim", "psnr")  # row order of MetricAccumulator.totals

# PSNR of a perfect frame is infinite; clamping its MSE caps it at 100 dB, so one
# exact frame cannot turn a whole test-set average into inf.
PSNR_MIN_MSE = 1e-10

SSIM_WINDOW = 7  # scikit-image's default window, which published SSIM figures use


class MetricAccumulator:
    """Running per-frame sums of MSE, MAE, SSIM and PSNR, as OpenSTL and PredRNN report them.

    For each predicted frame (values in [0, 1]):
      - mse, mae: SUM over pixels and channels of squared / absolute error, on raw
        (unclipped) predictions, so a model is charged for values outside [0, 1].
      - ssim: skimage.metrics.structural_similarity(pred, true, data_range=1.0) with its
        default 7x7 window, on predictions clipped to [0, 1].
      - psnr: 10 * log10(1 / per-pixel mean squared error), on clipped predictions; the
        MSE is clamped to PSNR_MIN_MSE, so a perfect frame scores 100 dB.
    compute() averages each over frames and sequences.

    State is `totals`, a float64 CPU tensor (4, T) of sums over sequences (rows in the
    order of METRIC_NAMES), and `count`, the number of sequences. Both are plain sums, so
    under torch.distributed `as_tensor()` -> all_reduce(SUM) -> `load_tensor()` gives
    the single-process result (up to float64 rounding from the summation order).
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
        if min(h, w) < SSIM_WINDOW:
            raise ValueError(f"SSIM uses a {SSIM_WINDOW}x{SSIM_WINDOW} window; frames of {h}x{w} are too small")
        pred = pred.detach().to(torch.float64)
        target = target.detach().to(pred.device, torch.float64)
        lo, hi = target.min().item(), target.max().item()
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"targets must lie in [0, 1] but span [{lo:.4g}, {hi:.4g}]; "
                             "divide uint8 frames by 255")

        err = pred - target
        mse = err.square().sum(dim=(2, 3, 4))  # (B, T)
        mae = err.abs().sum(dim=(2, 3, 4))  # (B, T)

        clipped = pred.clamp(0.0, 1.0)
        pixel_mse = (clipped - target).square().mean(dim=(2, 3, 4)).clamp_min(PSNR_MIN_MSE)  # (B, T)
        psnr = 10.0 * torch.log10(1.0 / pixel_mse)

        clipped_np = clipped.cpu().numpy()
        target_np = target.cpu().numpy()
        ssim = torch.empty(b, t, dtype=torch.float64)
        for i in range(b):
            for j in range(t):
                ssim[i, j] = _frame_ssim(clipped_np[i, j], target_np[i, j])

        per_frame = torch.stack([mse.sum(0).cpu(), mae.sum(0).cpu(), ssim.sum(0), psnr.sum(0).cpu()])
        self.totals += per_frame  # (4, T)
        self.count += b

    def as_tensor(self):
        """1-D float64 tensor (4 * T + 1,): totals flattened row by row, then count."""
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
        """Averages: {"mse", "mae", "ssim", "psnr": float, "per_frame_mse": list of T floats}."""
        if self.count == 0:
            raise ValueError("no sequences were added to MetricAccumulator; call update() first")
        per_frame = self.totals / self.count  # (4, T)
        result = {name: per_frame[k].mean().item() for k, name in enumerate(METRIC_NAMES)}
        result["per_frame_mse"] = per_frame[0].tolist()
        return result


def _frame_ssim(pred, true):
    """SSIM of one (C, H, W) float64 frame pair in [0, 1]."""
    if pred.shape[0] == 1:
        return structural_similarity(pred[0], true[0], data_range=1.0)
    return structural_similarity(pred, true, data_range=1.0, channel_axis=0)


def copy_last_frame(inputs, n_frames_output):
    """Baseline that repeats the last input frame. inputs (B, T_in, C, H, W) -> (B, T_out, C, H, W)."""
    return inputs[:, -1:].repeat(1, n_frames_output, 1, 1, 1)


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


def _atomic_write(path, write):
    """Call write(file) on a temporary file next to `path`, then rename it onto `path`.

    A crash or an exception leaves `path` as it was: the rename is atomic on POSIX and
    Windows when both names are in the same directory.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with mode 0o666 applies the umask, unlike tempfile's 0o600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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
    _atomic_write(path, lambda f: figure.save(f, format="PNG"))


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

    _atomic_write(path, write)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def atomic_save(obj, path):
    """torch.save(obj, path) through a temporary file, so `path` is never left half-written."""
    _atomic_write(path, lambda f: torch.save(obj, f))


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
    Raises ValueError naming the path if the file is missing or is not such a checkpoint.
    """
    path = os.fspath(path)
    prefix = f"{path} is not a checkpoint written by main.py"
    if not os.path.isfile(path):
        problem = "it is a directory" if os.path.isdir(path) else "no such file"
        raise ValueError(f"{prefix}: {problem}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load raises many types for foreign files (KeyError, EOFError, ...)
        raise ValueError(f"{prefix}: torch.load failed with {_first_line(err)}") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{prefix}: expected a dict, found {type(checkpoint).__name__}")
    missing = [key for key in ("model", "config") if key not in checkpoint]
    if missing:
        raise ValueError(f"{prefix}: the dict lacks {missing} (keys: {sorted(map(str, checkpoint))})")
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
        raise ValueError(f"--device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cpu":
        return device
    if device.type == "mps":
        if not _mps_available():
            raise ValueError(f"--device {name} requested but torch.backends.mps.is_available() is False")
        return device
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, ...
    if backend is None or not hasattr(backend, "is_available"):
        raise ValueError(f"--device {name} is not supported; use auto, cpu, cuda, cuda:N or mps")
    if not backend.is_available():
        raise ValueError(f"--device {name} requested but torch.{device.type}.is_available() is False")
    if device.index is not None and device.index >= backend.device_count():
        raise ValueError(f"--device {name} requested but only {backend.device_count()} "
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
# Formatting
# ---------------------------------------------------------------------------------------

_TABLE_FORMATS = {"mse": "{:.2f}", "mae": "{:.2f}", "ssim": "{:.4f}", "psnr": "{:.2f}"}


def format_metrics_table(rows):
    """Plain-text table, one line per model: rows {"model": {"mse": .., "mae": .., "ssim": .., "psnr": ..}}.

    A missing or None metric prints as "-"; other keys (e.g. per_frame_mse) are ignored.
    """
    header = ["model", *METRIC_NAMES]
    lines = []
    for name, metrics in rows.items():
        cells = [str(name)]
        for key in METRIC_NAMES:
            value = metrics.get(key)
            cells.append("-" if value is None else _TABLE_FORMATS[key].format(value))
        lines.append(cells)
    widths = [max(len(row[k]) for row in [header, *lines]) for k in range(len(header))]

    def render(cells):
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest])

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(cells) for cells in lines)])


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
