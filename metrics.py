"""Scores: the field's metrics per frame, the nowcasting scores where asked, the copy-last-frame baseline, and the one evaluation loop.

docs/metrics.md has the definitions and sources. main.py validates and evaluate.py tests
with `score`, so both report the same numbers the same way. Video tensors are
(B, T, C, H, W) in the data's units: [0, 1], or [LO, HI] for a run with --value-range.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from devices import synchronize
from model import from_unit, to_unit
from nowcast import BalancedErrorAccumulator, ContingencyAccumulator, threshold_key
from utils import check, format_table

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

    With `value_range` (LO, HI), frames are in the data's own units: mse and mae are in
    those units (squared), while ssim, ssim_openstl and psnr score the frames mapped to
    [0, 1] by (x - LO) / (HI - LO), which equals SSIM and PSNR with data_range HI - LO.

    State is `totals`, a float64 CPU tensor (len(METRIC_NAMES), T) of sums over sequences,
    and `count`, the number of sequences. Both are plain sums, so under torch.distributed
    `as_tensor()` -> all_reduce(SUM) -> `load_tensor()` gives the single-process result
    (up to float64 rounding from the summation order).
    """

    def __init__(self, n_frames, value_range=None):
        if n_frames < 1:
            raise ValueError(f"MetricAccumulator needs n_frames >= 1, got {n_frames}")
        self.n_frames = int(n_frames)
        self.value_range = None if value_range is None else tuple(float(v) for v in value_range)
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
        err = pred - target
        mse = err.square().sum(dim=(2, 3, 4))  # (B, T)
        mae = err.abs().sum(dim=(2, 3, 4))  # (B, T)

        pred, target = to_unit(pred, self.value_range), to_unit(target, self.value_range)
        lo, hi = target.min().item(), target.max().item()
        if self.value_range is None:
            check(lo >= -1e-6 and hi <= 1 + 1e-6,
                  f"targets must lie in [0, 1] but span [{lo:.4g}, {hi:.4g}]; divide uint8 frames by 255")
        else:
            check(lo >= -1e-6 and hi <= 1 + 1e-6,
                  f"targets must lie in the value range [{self.value_range[0]:g}, "
                  f"{self.value_range[1]:g}] but span [{from_unit(lo, self.value_range):.4g}, "
                  f"{from_unit(hi, self.value_range):.4g}]")

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


class ScoreSet:
    """Every score of one forecaster (the model or a baseline) over a test set, in the data's
    units: the field's metrics (MetricAccumulator) and, where asked, POD, FAR, CSI, HSS and
    bias per threshold (nowcast.ContingencyAccumulator) and B-MSE / B-MAE
    (nowcast.BalancedErrorAccumulator).

    `thresholds`: None or event thresholds; `balance`: None or (thresholds, weights) of the
    B-MSE bins. As each part, its state is plain sums: `as_tensor()` -> all_reduce(SUM) ->
    `load_tensor()` gives the single-process result (the counts exactly).
    """

    def __init__(self, n_frames, *, value_range=None, thresholds=None, balance=None):
        self.metrics = MetricAccumulator(n_frames, value_range)
        self.contingency = ContingencyAccumulator(thresholds, n_frames) if thresholds else None
        self.balanced = BalancedErrorAccumulator(n_frames, *balance) if balance else None

    @property
    def parts(self) -> list:
        return [p for p in (self.metrics, self.contingency, self.balanced) if p is not None]

    def update(self, pred, target):
        """Add a batch: (B, T, C, H, W) tensors in the data's units."""
        for part in self.parts:
            part.update(pred, target)

    def as_tensor(self) -> torch.Tensor:
        """1-D float64: each part's as_tensor() in turn (counts are exact below 2**53)."""
        return torch.cat([part.as_tensor(torch.float64) if part is self.contingency else
                          part.as_tensor() for part in self.parts])

    def load_tensor(self, tensor):
        sizes = [part.as_tensor().numel() for part in self.parts]
        for part, chunk in zip(self.parts, torch.split(tensor.detach().to("cpu").flatten(), sizes)):
            part.load_tensor(chunk)

    def compute(self) -> dict:
        """MetricAccumulator.compute(), plus "thresholds": {"<T>": {"pod", ...}} and
        "b_mse", "b_mae", "per_frame_b_mse", "per_frame_b_mae" where asked."""
        result = self.metrics.compute()
        if self.contingency is not None:
            result["thresholds"] = self.contingency.compute()
        if self.balanced is not None:
            result.update(self.balanced.compute())
        return result


def copy_last_frame(inputs, n_frames_output):
    """Baseline that repeats the last input frame. inputs (B, T_in, C, H, W) -> (B, T_out, C, H, W)."""
    return inputs[:, -1:].repeat(1, n_frames_output, 1, 1, 1)


# ---------------------------------------------------------------------------------------
# Evaluation: one loop for validation (main.py) and testing (evaluate.py)
# ---------------------------------------------------------------------------------------


@dataclass
class Scores:
    metrics: dict            # name -> ScoreSet: "model" and each baseline
    loss_sums: torch.Tensor  # float64 (2,): the model's summed squared error on [0, 1], pixel count
    first_batch: tuple       # (inputs, targets, predictions) of the first batch on [0, 1], on the CPU
    model_seconds: float     # time in the model's forward passes, device synchronised
    sequences: int

    @property
    def loss(self) -> float:
        """Per-pixel MSE, the training loss."""
        return (self.loss_sums[0] / self.loss_sums[1]).item()


@torch.no_grad()
def score(model, loader, device, amp_ctx, frames_output: int, baselines=None, *,
          value_range=None, thresholds=None, balance=None) -> Scores:
    """Predict every batch of `loader` and score the model and `baselines`
    ({name: fn(inputs, frames_output) -> predictions}) with a ScoreSet each.

    `loader` yields (inputs, targets) in the data's units; `model` is the network, which
    sees them mapped to [0, 1] by `value_range` (model.to_unit) and whose predictions are
    mapped back for scoring; the loss is on [0, 1], as in training. Baselines work in the
    data's units. `thresholds` and `balance` are ScoreSet's.
    """
    baselines = baselines or {}
    metrics = {name: ScoreSet(frames_output, value_range=value_range, thresholds=thresholds,
                              balance=balance) for name in ("model", *baselines)}
    loss_sums = torch.zeros(2, dtype=torch.float64, device=device)
    first, seconds, sequences = None, 0.0, 0
    was_training = model.training
    model.eval()
    for inputs, targets in loader:
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        unit_inputs, unit_targets = to_unit(inputs, value_range), to_unit(targets, value_range)
        t0 = time.perf_counter()
        with amp_ctx:
            pred = model(unit_inputs, frames_output=frames_output)
        pred = pred.float()
        synchronize(device)
        seconds += time.perf_counter() - t0
        loss_sums[0] += F.mse_loss(pred, unit_targets, reduction="sum").double()
        loss_sums[1] += targets.numel()
        metrics["model"].update(from_unit(pred, value_range), targets)
        for name, baseline in baselines.items():
            metrics[name].update(baseline(inputs, frames_output), targets)
        sequences += len(inputs)
        if first is None:
            first = (unit_inputs.cpu(), unit_targets.cpu(), pred.cpu())
    model.train(was_training)
    return Scores(metrics, loss_sums, first, seconds, sequences)


# ---------------------------------------------------------------------------------------
# Flags of the nowcasting scores, for main.py and evaluate.py
# ---------------------------------------------------------------------------------------


def check_thresholds(flag: str, thresholds, value_range, whose: str = "") -> None:
    """UsageError unless every threshold is finite, distinct and inside (LO, HI]: at LO or
    below every pixel is an event, above HI none is. Without value_range the units are [0, 1]."""
    lo, hi = (0.0, 1.0) if value_range is None else value_range
    where = f"{whose}value range [{lo:g}, {hi:g}]"
    if value_range is None:
        where += " (without --value-range the data's units are [0, 1]: uint8 / 255)"
    for t in thresholds:
        check(math.isfinite(t) and lo < t <= hi,
              f"{flag} {t:g} lies outside the {where}; thresholds are in the data's units "
              f"and must be above {lo:g} and at most {hi:g}")
    keys = [threshold_key(t) for t in thresholds]
    check(len(set(keys)) == len(keys), f"{flag} names a threshold twice: {' '.join(keys)}")


def check_balance(thresholds, weights, value_range, whose: str = "") -> None:
    """The B-MSE bins (--balance-thresholds, --balance-weights): increasing thresholds inside
    the value range, one more weight than thresholds, weights > 0."""
    check_thresholds("--balance-thresholds", thresholds, value_range, whose)
    check(all(a < b for a, b in zip(thresholds, thresholds[1:])),
          f"--balance-thresholds must increase, got {' '.join(f'{t:g}' for t in thresholds)}")
    check(len(weights) == len(thresholds) + 1,
          f"--balance-weights needs {len(thresholds) + 1} weights for {len(thresholds)} "
          f"--balance-thresholds (one per bin), got {len(weights)}")
    check(all(math.isfinite(w) and w > 0 for w in weights),
          f"--balance-weights must be > 0, got {' '.join(f'{w:g}' for w in weights)}")


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------

METRIC_COLUMNS = [("model", "model", "{}"), ("mse", "mse", "{:.2f}"), ("mae", "mae", "{:.2f}"),
                  ("ssim", "ssim", "{:.4f}"), ("psnr", "psnr", "{:.2f}"),
                  ("ssim_openstl", "ssim_openstl", "{:.4f}")]


BALANCED_COLUMNS = [("b_mse", "b_mse", "{:.2f}"), ("b_mae", "b_mae", "{:.2f}")]
THRESHOLD_COLUMNS = [("model", "model", "{}"), ("threshold", "threshold", "{}"),
                     ("pod", "pod", "{:.4f}"), ("far", "far", "{:.4f}"), ("csi", "csi", "{:.4f}"),
                     ("hss", "hss", "{:.4f}"), ("bias", "bias", "{:.4f}")]


def format_metrics_table(results: dict) -> str:
    """{name: metrics dict} (e.g. evaluate.py's "model" and "copy_last_baseline") as a table;
    B-MSE and B-MAE columns where the results have them."""
    columns = METRIC_COLUMNS + (BALANCED_COLUMNS if any("b_mse" in m for m in results.values()) else [])
    return format_table([{**metrics, "model": name} for name, metrics in results.items()], columns)


def format_thresholds_table(results: dict) -> str:
    """The nowcasting scores of each entry and threshold (means over lead times) as a table."""
    rows = [{**scores, "model": name, "threshold": key}
            for name, metrics in results.items()
            for key, scores in metrics.get("thresholds", {}).items()]
    return format_table(rows, THRESHOLD_COLUMNS)
