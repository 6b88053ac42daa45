"""Pictures of predictions: a grid of input, truth and prediction rows as a figure, and an animation.

Inputs are (B, T, C, H, W) tensors or arrays in [0, 1] (a run's frames mapped by its
--value-range), any C: 1 is drawn gray and 3 as RGB; any other count draws each channel as
its own gray rows, labelled "input c1", "truth c1", "prediction c1", "input c2", ... (the
three rows of a channel together, so truth and prediction sit one above the other). Files
are written atomically, in the format their name's extension says (picture_format).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from checkpoints import atomic_write

BACKGROUND = 224  # light gray between frames, distinct from MNIST's black background
LABEL_BACKGROUND = 255
ROW_LABELS = ("input", "truth", "prediction")

# Pillow formats for gray and RGB pictures, and those of them that hold an animation (PNG
# as APNG); which one a file gets is its extension's.
FIGURE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PDF")
ANIMATION_FORMATS = ("GIF", "WEBP", "PNG")
SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}  # sharp pixels, not blur


def picture_format(path, animated: bool = False) -> str:
    """The Pillow format of `path`'s extension (.png, .jpg, .gif, .webp, ...). Raises
    ValueError, naming the extensions that work, for one it can't write (or, `animated`,
    one that can't hold an animation)."""
    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    allowed, saving = (ANIMATION_FORMATS, Image.SAVE_ALL) if animated else (FIGURE_FORMATS, Image.SAVE)
    if fmt in allowed and fmt in saving:
        return fmt
    what = (f"{fmt} can't hold an animation" if fmt in FIGURE_FORMATS else
            f"{suffix} is not a picture format this writes" if suffix else "the name has no extension")
    raise ValueError(f"{what}; end the name in {'.gif, .webp or .png' if animated else '.png, .jpg, .gif or .webp'}")


def _as_video(x, what):
    """Tensor or array (B, T, C, H, W) -> float32 numpy array clipped to [0, 1]."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 5:
        raise ValueError(f"{what} must be (B, T, C, H, W), got shape {x.shape}")
    if x.shape[2] < 1:
        raise ValueError(f"{what} has no channels, shape {x.shape}")
    return np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0)  # NaN (diverged weights) drawn black


def _rows(inputs, targets, preds):
    """[(label, video)] of the picture's rows: the three videos as they are for 1 (gray) or 3
    (RGB) channels, else each channel's input, truth and prediction as (B, T, 1, H, W)."""
    videos = (inputs, targets, preds)
    c = inputs.shape[2]
    if c in (1, 3):
        return list(zip(ROW_LABELS, videos))
    return [(f"{label} c{k + 1}", video[:, :, k:k + 1])
            for k in range(c) for label, video in zip(ROW_LABELS, videos)]


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
    rows = _rows(inputs, targets, preds)

    height = pad + n * len(rows) * (h + pad) + (n - 1) * (seq_gap - pad)
    width = pad + n_cols * (w + pad)
    grid = np.full((height, width) + ((3,) if c == 3 else ()), BACKGROUND, dtype=np.uint8)
    spans = []
    y = pad
    for i in range(n):
        for label, video in rows:
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
    in [0, 1] (preds are clipped), any C (three gray rows per channel unless C is 1 or 3).
    Row j holds frames left to right; the shorter of T_in and T_out is padded with
    background. Returns uint8 (H_img, W_img), or (H_img, W_img, 3) for C = 3.
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
    """Write prediction_grid enlarged `scale` times (nearest neighbour), with row labels, as
    a PNG, JPEG, ... as the extension says (picture_format).

    Shapes as in prediction_grid. Parent directories are created; the write is atomic.
    """
    fmt = picture_format(path)
    grid, spans = _grid(inputs, targets, preds, max_sequences, pad)
    grid = _upscale(grid, scale)
    mode = "RGB" if grid.ndim == 3 else "L"
    ink = (0, 0, 0) if mode == "RGB" else 0
    paper = (LABEL_BACKGROUND,) * 3 if mode == "RGB" else LABEL_BACKGROUND

    draw = ImageDraw.Draw(Image.new(mode, (1, 1)))
    margin = 6
    label_width = max(_text_size(draw, label)[0] for _, _, label in spans) + 2 * margin
    figure = Image.new(mode, (label_width + grid.shape[1], grid.shape[0]), paper)
    figure.paste(Image.fromarray(grid), (label_width, 0))
    draw = ImageDraw.Draw(figure)
    for top, bottom, label in spans:
        _, text_h = _text_size(draw, label)
        y = (top + bottom) * scale // 2 - text_h // 2
        draw.text((margin, y), label, fill=ink)
    atomic_write(path, lambda f: figure.save(f, format=fmt, **SAVE_OPTIONS.get(fmt, {})))


def save_prediction_gif(path, inputs, targets, preds, *, max_sequences=4, duration_ms=200, pad=2, scale=2):
    """Write an animation with one pair [input-or-truth | prediction] per sequence, as a GIF,
    WebP or APNG as the extension says (picture_format).

    inputs (B, T_in, C, H, W); targets and preds (B, T_out, C, H, W). The animation has
    T_in + T_out frames: first each input frame beside a blank, then each true frame
    beside its prediction (clipped to [0, 1]). A caption names the phase and frame number.
    Channels are drawn as prediction_grid draws them: gray, RGB, or one gray pair per
    channel, top to bottom. Parent directories are created; the write is atomic.
    """
    fmt = picture_format(path, animated=True)
    inputs, targets, preds = _check_videos(inputs, targets, preds)
    n = min(inputs.shape[0], max_sequences)
    t_in, t_out = inputs.shape[1], targets.shape[1]
    c, h, w = inputs.shape[2:]
    mode = "RGB" if c == 3 else "L"
    ink = (0, 0, 0) if mode == "RGB" else 0
    paper = (LABEL_BACKGROUND,) * 3 if mode == "RGB" else LABEL_BACKGROUND
    seq_gap = 3 * pad * scale
    cell_w, cell_h, pad_s = w * scale, h * scale, pad * scale
    layers = [slice(None)] if c in (1, 3) else [slice(k, k + 1) for k in range(c)]  # one per row

    captions = ([f"input {k + 1}/{t_in}" for k in range(t_in)]
                + [f"truth | prediction {k + 1}/{t_out}" for k in range(t_out)])
    draw = ImageDraw.Draw(Image.new(mode, (1, 1)))
    text_w = max(_text_size(draw, s)[0] for s in captions)
    text_h = max(_text_size(draw, s)[1] for s in captions)
    header = text_h + 6
    content_w = n * (2 * cell_w + pad_s) + (n - 1) * seq_gap + 2 * pad_s
    width = max(content_w, text_w + 2 * pad_s + 4)
    height = header + len(layers) * (cell_h + pad_s)

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
            for row, layer in enumerate(layers):
                y = header + row * (cell_h + pad_s)
                for offset, frame in ((0, left[layer]), (cell_w + pad_s, right[layer])):
                    cell = Image.fromarray(_upscale(_to_uint8(frame), scale))
                    image.paste(cell, (x + offset, y))
        ImageDraw.Draw(image).text((pad_s + 2, 3), caption, fill=ink)
        frames.append(image)

    def write(f):
        # Pillow merges identical consecutive frames; the frame number in the caption
        # keeps every frame distinct, so the animation always has T_in + T_out frames.
        frames[0].save(f, format=fmt, save_all=True, append_images=frames[1:],
                       duration=duration_ms, loop=0, **SAVE_OPTIONS.get(fmt, {}))

    atomic_write(path, write)
