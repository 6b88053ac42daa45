"""The optical-flow baseline: a constant shift is extrapolated exactly (away from the
borders), units, dtypes and channels are kept, and a missing OpenCV is one clear line."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flow import optical_flow_forecast, require_opencv
from utils import UsageError

SHIFT_X, SHIFT_Y = 2, 1  # pixels per frame: right and down


def smooth_texture(h, w, seed):
    """Random texture (h, w) in [0, 1], blurred (sigma 2 px) so optical flow can follow it."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, h + 12, w + 12, generator=g, dtype=torch.float64)  # the blur eats 12
    k = torch.exp(-torch.arange(-6, 7, dtype=torch.float64) ** 2 / 8)
    k = k / k.sum()
    blurred = F.conv2d(F.conv2d(noise, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))[0, 0]
    return (blurred - blurred.min()) / (blurred.max() - blurred.min())


def translating(n_frames, channels=1, h=48, w=64, seed=0):
    """(1, n_frames, C, h, w) float64 frames whose content moves SHIFT_X right and SHIFT_Y
    down per frame: frame t is the big texture's window shifted back by t steps."""
    pad = n_frames * max(SHIFT_X, SHIFT_Y)
    textures = [smooth_texture(h + pad, w + pad, seed + c) for c in range(channels)]
    frames = [torch.stack([tex[pad - SHIFT_Y * t: pad - SHIFT_Y * t + h, pad - SHIFT_X * t: pad - SHIFT_X * t + w]
                           for tex in textures]) for t in range(n_frames)]
    return torch.stack(frames)[None]


def interior(x, lead):
    """Drop the border that content enters through by lead time `lead` (1-based), plus a
    margin where the flow estimate itself is unreliable."""
    m = (SHIFT_X + SHIFT_Y) * lead + 6
    return x[..., m:-m, m:-m]


@pytest.fixture
def cv2():
    return pytest.importorskip("cv2", reason="OpenCV (optional) not installed")


def test_constant_shift_is_extrapolated(cv2):
    frames = translating(10)
    inputs, truth = frames[:, :6].float(), frames[:, 6:].float()
    pred = optical_flow_forecast(inputs, 4)
    assert pred.shape == (1, 4, 1, 48, 64) and pred.dtype == torch.float32
    for k in range(4):
        err = (interior(pred[0, k], k + 1) - interior(truth[0, k], k + 1)).abs()
        still = (interior(inputs[0, -1], k + 1) - interior(truth[0, k], k + 1)).abs()
        assert err.max() < 0.02, f"lead time {k + 1}"
        assert still.mean() > 20 * err.mean()  # the shift is large next to the error


def test_units_channels_and_numpy_are_kept(cv2):
    # Two channels in different physical units (dBZ-like 0..70 and -1..1), as float64 numpy.
    frames = translating(9, channels=2, seed=7)
    frames[:, :, 0] *= 70
    frames[:, :, 1] = 2 * frames[:, :, 1] - 1
    inputs, truth = frames[:, :6].numpy(), frames[:, 6:].numpy()
    pred = optical_flow_forecast(inputs, 3)
    assert isinstance(pred, np.ndarray) and pred.dtype == np.float64 and pred.shape == (1, 3, 2, 48, 64)
    for k in range(3):
        err = np.abs(interior(pred[0, k], k + 1) - interior(truth[0, k], k + 1)).max(axis=(1, 2))
        assert err[0] < 0.02 * 70 and err[1] < 0.02 * 2, f"lead time {k + 1}"


def test_integer_frames_stay_integer(cv2):
    frames = (translating(8) * 255).round().to(torch.uint8)
    pred = optical_flow_forecast(frames[:, :6], 2)
    assert pred.dtype == torch.uint8
    err = (interior(pred[0, 1], 2).int() - interior(frames[0, 7], 2).int()).abs()
    assert err.max() <= 6


def test_outside_fill(cv2):
    inputs = translating(6).float() + 0.5  # no zeros inside the texture
    zeros = optical_flow_forecast(inputs, 3)
    border = optical_flow_forecast(inputs, 3, outside="border")
    # By lead time 3 the content has moved 6 px right: the left 4 columns came from outside.
    strip = (slice(None), slice(8, -8), slice(0, 4))  # (C, H, W)
    assert torch.all(zeros[0, 2][strip] == 0)
    assert torch.all(border[0, 2][strip] > 0.4)
    with pytest.raises(ValueError, match="outside"):
        optical_flow_forecast(inputs, 3, outside="reflect")


def test_static_frames_give_the_last_frame(cv2):
    frame = translating(1)
    inputs = frame.repeat(1, 4, 1, 1, 1).float()
    pred = optical_flow_forecast(inputs, 3)
    assert (pred - inputs[:, -1:]).abs().max() < 1e-3


def test_needs_two_frames_of_twelve_pixels(cv2):
    with pytest.raises(ValueError, match="T_in >= 2"):
        optical_flow_forecast(torch.rand(1, 1, 1, 16, 16), 3)
    with pytest.raises(UsageError, match="--baselines optical-flow.*at least 12x12 pixels, got 11x64"):
        optical_flow_forecast(torch.rand(1, 3, 1, 11, 64), 3)
    assert optical_flow_forecast(torch.rand(1, 3, 1, 12, 12), 3).shape == (1, 3, 1, 12, 12)


def test_missing_opencv_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    with pytest.raises(UsageError) as err:
        optical_flow_forecast(torch.rand(1, 3, 1, 16, 16), 2)
    message = str(err.value)
    assert "\n" not in message
    assert "--baselines optical-flow" in message
    assert "pip install opencv-python-headless" in message
    with pytest.raises(UsageError, match="opencv-python-headless"):
        require_opencv()  # what a CLI calls while checking --baselines


@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
    pytest.param("mps", marks=pytest.mark.skipif(not torch.backends.mps.is_available(), reason="no MPS"))])
def test_accelerator_matches_cpu(cv2, device):
    inputs = translating(6).float()
    on_cpu = optical_flow_forecast(inputs, 3)
    on_device = optical_flow_forecast(inputs.to(device), 3)
    assert on_device.device.type == device and on_device.dtype == torch.float32
    assert (on_device.cpu() - on_cpu).abs().max() < 1e-4
