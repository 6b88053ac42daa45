"""The optical-flow extrapolation baseline: motion from the last two input frames (OpenCV's DIS
flow), then the last frame advected along it, semi-Lagrangian, for every lead time.

This is the kind of baseline Shi et al. 2015 compared ConvLSTM with (ROVER). The motion is
held constant over the forecast, as ROVER and pysteps' extrapolation do: each output pixel
follows the motion field backward, step by step, to where it came from in the last input
frame, which is sampled there once (bilinear), so the picture is not blurred again at each
lead time. Pixels whose trajectory leaves the frame are filled with 0 (outside="zeros") or
with the nearest edge pixel (outside="border").

OpenCV (`opencv-python-headless`) is an optional dependency, imported on first use.

Example:
    >>> import torch
    >>> from flow import optical_flow_forecast
    >>> inputs = torch.rand(4, 10, 1, 64, 64)  # (B, T_in, C, H, W), any units
    >>> optical_flow_forecast(inputs, 10).shape  # (B, T_out, C, H, W), same units and dtype
    torch.Size([4, 10, 1, 64, 64])
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from utils import UsageError

MIN_SIZE = 12  # OpenCV's DIS flow refuses frames smaller than this on either side
MISSING_OPENCV = ("the optical-flow baseline (--baselines optical-flow) needs OpenCV: "
                  "pip install opencv-python-headless")


def require_opencv():
    """The cv2 module, or UsageError (one line naming the flag and the pip command). Call it
    while checking flags, so a run without OpenCV stops before any work."""
    try:
        import cv2
    except ImportError:
        raise UsageError(MISSING_OPENCV) from None
    return cv2


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    """(2, C, H, W) float -> (2, H, W) uint8 for OpenCV: each channel scaled to [0, 1] by its
    range over both frames (channels may have different units), then the channel mean."""
    lo = frames.min(axis=(0, 2, 3), keepdims=True)
    span = frames.max(axis=(0, 2, 3), keepdims=True) - lo
    scaled = np.where(span > 0, (frames - lo) / np.where(span > 0, span, 1.0), 0.0)
    return np.rint(scaled.mean(axis=1) * 255.0).astype(np.uint8)


def motion_field(previous: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Backward flow (H, W, 2) in pixels, (dx, dy), on the last frame's grid: the content at
    (x, y) of `last` was at (x + dx, y + dy) of `previous`. Frames: (C, H, W) float arrays."""
    cv2 = require_opencv()
    prev8, last8 = _to_uint8(np.stack([previous, last]))
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(last8, prev8, None)


def _normalized(x: torch.Tensor, y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pixel coordinates -> grid_sample's [-1, 1] grid (align_corners=True), (..., 2)."""
    return torch.stack([2.0 * x / max(w - 1, 1) - 1.0, 2.0 * y / max(h - 1, 1) - 1.0], dim=-1)


def advect(frame: torch.Tensor, flow: torch.Tensor, n_steps: int, outside: str = "zeros") -> torch.Tensor:
    """Semi-Lagrangian extrapolation of one frame (C, H, W) along a constant backward flow
    (H, W, 2) -> (n_steps, C, H, W), in the frame's floating dtype and on its device."""
    _, h, w = frame.shape
    flow = flow.to(frame.device, frame.dtype).permute(2, 0, 1)[None]  # (1, 2, H, W)
    ys, xs = torch.meshgrid(torch.arange(h, device=frame.device, dtype=frame.dtype),
                            torch.arange(w, device=frame.device, dtype=frame.dtype), indexing="ij")
    x, y = xs, ys  # each output pixel's departure point, walked back one step at a time
    out = []
    for _ in range(n_steps):
        # the motion at the current departure point, not at the arrival pixel: trajectories
        # may curve where the field varies
        grid = _normalized(x, y, h, w)[None]  # (1, H, W, 2)
        step = F.grid_sample(flow, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
        x, y = x + step[0], y + step[1]
        grid = _normalized(x, y, h, w)[None]
        out.append(F.grid_sample(frame[None], grid, mode="bilinear", padding_mode=outside,
                                 align_corners=True)[0])  # (C, H, W)
    return torch.stack(out)


def optical_flow_forecast(inputs, n_frames_output: int, *, outside: str = "zeros"):
    """Extrapolate each sequence's last frame along the motion between its last two frames.

    inputs: (B, T_in, C, H, W) torch tensor or numpy array, T_in >= 2, in any units.
    Returns (B, n_frames_output, C, H, W) of the same kind, units, dtype and device. Motion is
    estimated from the channel mean (each channel scaled to [0, 1] first) and every channel is
    advected along it. outside: "zeros" or "border", what fills pixels that come from outside
    the frame. Raises UsageError when OpenCV is missing.
    """
    require_opencv()  # fail before any work when OpenCV is missing
    if outside not in ("zeros", "border"):
        raise ValueError(f'outside must be "zeros" or "border", got {outside!r}')
    as_numpy = not isinstance(inputs, torch.Tensor)
    x = torch.from_numpy(np.ascontiguousarray(inputs)) if as_numpy else inputs.detach()
    if x.dim() != 5 or x.shape[1] < 2:
        raise ValueError(f"optical_flow_forecast expects (B, T_in >= 2, C, H, W) inputs, got shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < MIN_SIZE:
        raise UsageError(f"the optical-flow baseline (--baselines optical-flow) needs frames of at least "
                         f"{MIN_SIZE}x{MIN_SIZE} pixels, got {x.shape[-2]}x{x.shape[-1]}; leave it out of --baselines")
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()  # what grid_sample takes
    last_two = work[:, -2:].to("cpu", torch.float32).numpy()  # (B, 2, C, H, W)
    out = torch.stack([advect(work[i, -1], torch.from_numpy(motion_field(*last_two[i])),
                              n_frames_output, outside) for i in range(x.shape[0])])
    if not x.is_floating_point():  # integer data (uint8 frames): round back into its range
        info = torch.iinfo(x.dtype)
        out = out.round().clamp(info.min, info.max)
    out = out.to(x.dtype)
    return out.numpy() if as_numpy else out
