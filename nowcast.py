"""Nowcasting scores: POD, FAR, CSI, HSS and frequency bias per threshold and lead time,
B-MSE / B-MAE, and the balanced training loss (Shi et al. 2015 §4.2; Shi et al. 2017, HKO-7).

Everything takes (B, T, C, H, W) tensors on any device. The accumulators score values in the
data's own units (mm/h, dBZ, VIL pixels: whatever the file holds); the loss works on the
model's training scale. Only torch and the standard library are imported, so evaluation and
validation can use this under torchrun without pulling anything else in.

Example:
    >>> import torch
    >>> from nowcast import ContingencyAccumulator, BalancedErrorAccumulator
    >>> truth = torch.rand(2, 10, 1, 16, 16) * 40  # rain rate in mm/h
    >>> pred = truth + torch.randn_like(truth)
    >>> counts = ContingencyAccumulator([0.5, 2, 5, 10, 30], n_frames=10)
    >>> counts.update(pred, truth)  # once per batch; counts are summed, not averaged
    >>> scores = counts.compute()
    >>> sorted(scores), sorted(scores["0.5"])
    (['0.5', '10', '2', '30', '5'], ['bias', 'csi', 'far', 'hss', 'per_frame', 'pod'])
    >>> len(scores["30"]["per_frame"]["csi"])
    10
    >>> errors = BalancedErrorAccumulator(n_frames=10)
    >>> errors.update(pred, truth)
    >>> sorted(errors.compute())
    ['b_mae', 'b_mse', 'per_frame_b_mae', 'per_frame_b_mse']
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Shi et al. 2017 (HKO-7): rain-rate thresholds in mm/h for CSI and HSS, and the B-MSE /
# B-MAE weights: 1 below 2 mm/h, 2 in [2, 5), 5 in [5, 10), 10 in [10, 30), 30 from 30 up.
HKO7_THRESHOLDS = (0.5, 2.0, 5.0, 10.0, 30.0)
BALANCE_THRESHOLDS = (2.0, 5.0, 10.0, 30.0)
BALANCE_WEIGHTS = (1.0, 2.0, 5.0, 10.0, 30.0)

SCORE_NAMES = ("pod", "far", "csi", "hss", "bias")
COUNT_NAMES = ("hits", "false_alarms", "misses", "correct_negatives")  # a, b, c, d


def threshold_key(threshold: float) -> str:
    """The JSON key of a threshold: format(T, "g"), e.g. 0.5 -> "0.5", 20.0 -> "20"."""
    return format(threshold, "g")


def rain_rate_to_dbz(rain_rate, a: float = 58.53, b: float = 1.56):
    """Reflectivity in dBZ of a rain rate in mm/h by Z = a R^b (HKO-7's a and b).

    Use it to put the HKO-7 thresholds into dBZ data's units: 0.5 mm/h is about 13.0 dBZ.
    Works on floats and tensors.
    """
    if isinstance(rain_rate, torch.Tensor):
        return 10.0 * math.log10(a) + 10.0 * b * torch.log10(rain_rate)
    return 10.0 * math.log10(a) + 10.0 * b * math.log10(rain_rate)


def _check_5d(pred, true):
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != truth shape {tuple(true.shape)}")
    if pred.dim() != 5:
        raise ValueError(f"nowcasting scores expect (B, T, C, H, W) tensors, got shape {tuple(pred.shape)}")


def _ratio(num: int, den: int):
    """num / den, or None where the denominator is 0 (the score is undefined)."""
    return num / den if den else None  # Python ints: exact, and int / int rounds once


def _mean_defined(values: list):
    """Mean of the values that are not None; None if every value is None."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def categorical_scores(a: int, b: int, c: int, d: int) -> dict:
    """POD, FAR, CSI, HSS and frequency bias from hits a, false alarms b, misses c and correct
    negatives d. A score whose denominator is 0 is None.

    POD = a/(a+c), FAR = b/(a+b), CSI = a/(a+b+c), bias = (a+b)/(a+c),
    HSS = 2(ad - bc) / ((a+c)(c+d) + (a+b)(b+d)).
    """
    a, b, c, d = (int(v) for v in (a, b, c, d))
    return {
        "pod": _ratio(a, a + c),
        "far": _ratio(b, a + b),
        "csi": _ratio(a, a + b + c),
        "hss": _ratio(2 * (a * d - b * c), (a + c) * (c + d) + (a + b) * (b + d)),
        "bias": _ratio(a + b, a + c),
    }


class ContingencyAccumulator:
    """Hits, false alarms, misses and correct negatives per threshold and lead time, summed over
    every pixel and channel of every sequence added.

    A pixel is an event where its value is >= the threshold, in the units of the tensors
    passed to update() (the data's own units).

    State is `counts`, an int64 CPU tensor (K thresholds, T lead times, 4) whose last axis is
    COUNT_NAMES = (hits a, false alarms b, misses c, correct negatives d). Counts are plain
    sums, so under torch.distributed `as_tensor()` -> all_reduce(SUM) -> `load_tensor()` gives
    exactly the single-process counts.

    compute() scores each lead time from its summed counts, then takes the headline value per
    threshold as the mean over lead times (the HKO-7 convention). A score whose denominator is
    0 at some lead time (e.g. POD where the truth has no event) is None there, and the headline
    is the mean over the lead times where it is defined (None if it is defined at none).
    """

    def __init__(self, thresholds: Sequence[float], n_frames: int):
        thresholds = [float(t) for t in thresholds]
        if not thresholds:
            raise ValueError("ContingencyAccumulator needs at least one threshold")
        if not all(math.isfinite(t) for t in thresholds):
            raise ValueError(f"thresholds must be finite, got {thresholds}")
        keys = [threshold_key(t) for t in thresholds]
        if len(set(keys)) != len(keys):
            raise ValueError(f"thresholds must differ, got {keys}")
        if n_frames < 1:
            raise ValueError(f"ContingencyAccumulator needs n_frames >= 1, got {n_frames}")
        self.thresholds = tuple(thresholds)
        self.n_frames = int(n_frames)
        self.reset()

    def reset(self):
        self.counts = torch.zeros(len(self.thresholds), self.n_frames, 4, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred, true):
        """Add a batch. pred, true: (B, T, C, H, W) on any device and dtype, T == n_frames."""
        _check_5d(pred, true)
        if pred.shape[1] != self.n_frames:
            raise ValueError(f"ContingencyAccumulator was built for {self.n_frames} frames "
                             f"but got {pred.shape[1]}")
        true = true.detach().to(pred.device)
        pred = pred.detach()
        dims = (0, 2, 3, 4)
        pixels = pred.numel() // self.n_frames  # per lead time: B * C * H * W
        batch = []
        for t in self.thresholds:
            forecast, observed = pred >= t, true >= t  # bool (B, T, C, H, W)
            a = (forecast & observed).sum(dims)  # int64 (T,)
            b = forecast.sum(dims) - a
            c = observed.sum(dims) - a
            batch.append(torch.stack([a, b, c, pixels - a - b - c], dim=-1))  # (T, 4)
        self.counts += torch.stack(batch).cpu()  # (K, T, 4)

    def as_tensor(self, dtype=torch.int64):
        """Flat (K * T * 4,) tensor of the counts, for all_reduce(SUM). float64 (to concatenate
        with MetricAccumulator.as_tensor()) is exact up to 2**53 pixels per count."""
        return self.counts.flatten().to(dtype)

    def load_tensor(self, tensor):
        """Restore the counts from an `as_tensor()` layout, e.g. after all_reduce(SUM)."""
        tensor = tensor.detach().to("cpu").flatten()
        if tensor.numel() != self.counts.numel():
            raise ValueError(f"expected a tensor of {self.counts.numel()} counts for "
                             f"{len(self.thresholds)} thresholds and {self.n_frames} frames, "
                             f"got {tensor.numel()}")
        if tensor.is_floating_point():
            tensor = tensor.round()
        self.counts = tensor.to(torch.int64).reshape(self.counts.shape).clone()

    def compute(self) -> dict:
        """{"<T>": {"pod", "far", "csi", "hss", "bias": mean over lead times,
                    "per_frame": {name: [T values]}}} with "<T>" = format(T, "g");
        undefined values are None (JSON null)."""
        if not self.counts.any():
            raise ValueError("no pixels were added to ContingencyAccumulator; call update() first")
        result = {}
        for threshold, per_threshold in zip(self.thresholds, self.counts.tolist()):
            frames = [categorical_scores(*counts) for counts in per_threshold]
            per_frame = {name: [f[name] for f in frames] for name in SCORE_NAMES}
            entry = {name: _mean_defined(per_frame[name]) for name in SCORE_NAMES}
            entry["per_frame"] = per_frame
            result[threshold_key(threshold)] = entry
        return result


def balance_weights(true: torch.Tensor, thresholds: Sequence[float] = BALANCE_THRESHOLDS,
                    weights: Sequence[float] = BALANCE_WEIGHTS) -> torch.Tensor:
    """Per-pixel weights from the truth's value: weights[i] where thresholds[i-1] <= value <
    thresholds[i] (weights[0] below thresholds[0], weights[-1] from thresholds[-1] up).

    true: any shape; returns the same shape, on its device and in its floating dtype.
    """
    if len(weights) != len(thresholds) + 1:
        raise ValueError(f"{len(thresholds)} thresholds need {len(thresholds) + 1} weights, "
                         f"got {len(weights)}")
    if any(hi <= lo for lo, hi in zip(thresholds, thresholds[1:])):
        raise ValueError(f"balance thresholds must increase, got {list(thresholds)}")
    dtype = true.dtype if true.is_floating_point() else torch.float32
    bounds = torch.tensor(thresholds, dtype=dtype, device=true.device)
    table = torch.tensor(weights, dtype=dtype, device=true.device)
    # right=True: the bin index is the number of thresholds <= value, so a value equal to a
    # threshold takes the upper bin's weight.
    return table[torch.bucketize(true.to(dtype), bounds, right=True)]


class BalancedErrorAccumulator:
    """B-MSE and B-MAE (Shi et al. 2017): squared / absolute errors weighted by
    balance_weights(truth), summed over one frame's pixels and channels like MSE, then averaged
    over frames and sequences.

    The defaults are HKO-7's weights on rain rate in mm/h; pass the thresholds in the data's own
    units (e.g. rain_rate_to_dbz of them for dBZ data).

    State is `totals`, a float64 CPU tensor (2, T) of per-frame sums over sequences (row 0
    B-MSE, row 1 B-MAE), and `count`, the number of sequences; `as_tensor()` ->
    all_reduce(SUM) -> `load_tensor()` gives the single-process result, like MetricAccumulator.
    """

    def __init__(self, n_frames: int, thresholds: Sequence[float] = BALANCE_THRESHOLDS,
                 weights: Sequence[float] = BALANCE_WEIGHTS):
        if n_frames < 1:
            raise ValueError(f"BalancedErrorAccumulator needs n_frames >= 1, got {n_frames}")
        balance_weights(torch.zeros(1), thresholds, weights)  # validates them now, not mid-test
        self.n_frames = int(n_frames)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.weights = tuple(float(w) for w in weights)
        self.reset()

    def reset(self):
        self.totals = torch.zeros(2, self.n_frames, dtype=torch.float64)
        self.count = 0

    @torch.no_grad()
    def update(self, pred, true):
        """Add a batch. pred, true: (B, T, C, H, W) on any device and dtype, T == n_frames."""
        _check_5d(pred, true)
        if pred.shape[1] != self.n_frames:
            raise ValueError(f"BalancedErrorAccumulator was built for {self.n_frames} frames "
                             f"but got {pred.shape[1]}")
        pred = pred.detach().to(torch.float64)
        true = true.detach().to(pred.device, torch.float64)
        w = balance_weights(true, self.thresholds, self.weights)
        err = pred - true
        sums = torch.stack([(w * err.square()).sum((2, 3, 4)).sum(0),
                            (w * err.abs()).sum((2, 3, 4)).sum(0)])  # (2, T)
        self.totals += sums.cpu()
        self.count += pred.shape[0]

    def as_tensor(self):
        """1-D float64 tensor (2 * T + 1,): the totals row by row, then the count."""
        return torch.cat([self.totals.flatten(), torch.tensor([float(self.count)], dtype=torch.float64)])

    def load_tensor(self, tensor):
        """Restore the state from an `as_tensor()` layout, e.g. after all_reduce(SUM)."""
        tensor = tensor.detach().to("cpu", torch.float64).flatten()
        if tensor.numel() != 2 * self.n_frames + 1:
            raise ValueError(f"expected a tensor of {2 * self.n_frames + 1} values for "
                             f"{self.n_frames} frames, got {tensor.numel()}")
        self.totals = tensor[:-1].reshape(2, self.n_frames).clone()
        self.count = int(round(tensor[-1].item()))

    def compute(self) -> dict:
        """{"b_mse": float, "b_mae": float, "per_frame_b_mse": [T], "per_frame_b_mae": [T]}."""
        if self.count == 0:
            raise ValueError("no sequences were added to BalancedErrorAccumulator; call update() first")
        per_frame = self.totals / self.count  # (2, T)
        return {"b_mse": per_frame[0].mean().item(), "b_mae": per_frame[1].mean().item(),
                "per_frame_b_mse": per_frame[0].tolist(), "per_frame_b_mae": per_frame[1].tolist()}


def balanced_loss(pred: torch.Tensor, target: torch.Tensor, thresholds: Sequence[float],
                  weights: Sequence[float], *, mae: bool = True) -> torch.Tensor:
    """Training loss of Shi et al. 2017: the per-pixel mean of w * (pred - target)^2, plus
    w * |pred - target| when mae is True (B-MSE + B-MAE, as HKO-7's TrajGRU trained), with
    w = balance_weights(target, thresholds, weights).

    pred, target: (B, T, C, H, W) on the training scale. The model trains on values mapped to
    [0, 1], so `thresholds` must be mapped the same way first: (T - LO) / (HI - LO) for
    --value-range LO HI. A mean over pixels (not a per-frame sum) keeps the loss on the same
    scale as the plain "mse" loss, so learning rates carry over. Returns a float32 scalar.
    """
    pred = pred.float()  # under autocast the model may hand back bf16 / fp16
    target = target.float()
    w = balance_weights(target, thresholds, weights)
    err = pred - target
    value = (w * err.square()).mean()
    if mae:
        value = value + (w * err.abs()).mean()
    return value
