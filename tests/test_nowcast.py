"""Nowcasting scores: hand-counted fixtures, oracles (pysteps, torchmetrics), summing over
batches and ranks, B-MSE / B-MAE and the balanced loss."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nowcast import (BALANCE_THRESHOLDS, BALANCE_WEIGHTS, BalancedErrorAccumulator,
                     ContingencyAccumulator, balance_weights, balanced_loss, rain_rate_to_dbz,
                     threshold_key)

NAMES = ("pod", "far", "csi", "hss", "bias")


def hand_fixture():
    """(1, 3, 2, 2, 2) truth and prediction. Frame 0, pixel by pixel (truth, prediction):
    (2, 3) (2, 0) (0, 2) (0, 0) | (1, 1) (0.99, 0.5) (6, 1) (0, 7).
    Frame 1: only the prediction's first pixel is 7. Frame 2: all zero."""
    true = torch.zeros(1, 3, 2, 2, 2)
    pred = torch.zeros(1, 3, 2, 2, 2)
    true[0, 0] = torch.tensor([2, 2, 0, 0, 1, 0.99, 6, 0]).reshape(2, 2, 2)
    pred[0, 0] = torch.tensor([3, 0, 2, 0, 1, 0.5, 1, 7]).reshape(2, 2, 2)
    pred[0, 1, 0, 0, 0] = 7
    return pred, true


def test_scores_equal_hand_counts():
    pred, true = hand_fixture()
    acc = ContingencyAccumulator([1, 5, 100], n_frames=3)
    acc.update(pred, true)
    # Counted by hand, (hits, false alarms, misses, correct negatives) per frame.
    assert acc.counts[0].tolist() == [[3, 2, 1, 2], [0, 1, 0, 7], [0, 0, 0, 8]]  # >= 1
    assert acc.counts[1].tolist() == [[0, 1, 1, 6], [0, 1, 0, 7], [0, 0, 0, 8]]  # >= 5
    assert acc.counts[2].tolist() == [[0, 0, 0, 8]] * 3  # >= 100

    scores = acc.compute()
    assert list(scores) == ["1", "5", "100"]
    one, five = scores["1"]["per_frame"], scores["5"]["per_frame"]
    # Frame 0 at 1: a=3 b=2 c=1 d=2; HSS = 2(6 - 2) / (4*3 + 5*4) = 1/4.
    assert one["pod"] == [0.75, None, None]
    assert one["far"] == [pytest.approx(0.4), 1.0, None]
    assert one["csi"] == [0.5, 0.0, None]
    assert one["bias"] == [1.25, None, None]
    assert one["hss"] == [0.25, 0.0, None]
    # Frame 0 at 5: a=0 b=1 c=1 d=6; HSS = 2(0 - 1) / (1*7 + 1*7) = -1/7.
    assert five["pod"] == [0.0, None, None]
    assert five["far"] == [1.0, 1.0, None]
    assert five["csi"] == [0.0, 0.0, None]
    assert five["bias"] == [1.0, None, None]
    assert five["hss"] == [pytest.approx(-1 / 7), 0.0, None]
    # Headlines: the mean over the lead times where a score is defined.
    assert scores["1"]["pod"] == 0.75
    assert scores["1"]["far"] == pytest.approx(0.7)
    assert scores["1"]["csi"] == 0.25
    assert scores["1"]["bias"] == 1.25
    assert scores["1"]["hss"] == 0.125
    assert scores["5"]["hss"] == pytest.approx(-1 / 14)
    # Nothing reaches 100 anywhere: every score is undefined, and JSON writes null.
    assert all(scores["100"][name] is None for name in NAMES)
    assert json.loads(json.dumps(scores))["100"]["per_frame"]["csi"] == [None, None, None]


def test_json_shape_is_the_contract():
    acc = ContingencyAccumulator([0.5, 20, 2.0, 0.001], n_frames=4)
    acc.update(torch.rand(2, 4, 1, 8, 8) * 30, torch.rand(2, 4, 1, 8, 8) * 30)
    scores = json.loads(json.dumps(acc.compute()))
    assert list(scores) == ["0.5", "20", "2", "0.001"]
    for entry in scores.values():
        assert set(entry) == {*NAMES, "per_frame"}
        assert set(entry["per_frame"]) == set(NAMES)
        assert all(len(entry["per_frame"][name]) == 4 for name in NAMES)
    assert threshold_key(30.0) == "30" and threshold_key(0.5) == "0.5"


def test_counts_are_summed_over_batches_not_averaged():
    # Batch 1 alone has CSI 1 and batch 2 alone CSI 1/4; pooled, a=2 b=2 c=1 gives 2/5.
    true = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0]]).reshape(2, 1, 1, 1, 4)
    pred = torch.tensor([[1.0, 0, 0, 0], [1, 0, 1, 1]]).reshape(2, 1, 1, 1, 4)
    acc = ContingencyAccumulator([0.5], n_frames=1)
    acc.update(pred[:1], true[:1])
    acc.update(pred[1:], true[1:])
    assert acc.compute()["0.5"]["csi"] == pytest.approx(0.4)

    g = torch.Generator().manual_seed(1)
    true, pred = torch.rand(6, 5, 2, 9, 7, generator=g), torch.rand(6, 5, 2, 9, 7, generator=g)
    whole, parts = ContingencyAccumulator([0.3, 0.7], 5), ContingencyAccumulator([0.3, 0.7], 5)
    whole.update(pred, true)
    parts.update(pred[:2], true[:2])
    parts.update(pred[2:], true[2:])
    assert torch.equal(whole.counts, parts.counts)
    assert whole.compute() == parts.compute()


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_counts_summed_over_ranks_equal_one_process(dtype):
    g = torch.Generator().manual_seed(2)
    true, pred = torch.rand(5, 3, 1, 8, 8, generator=g), torch.rand(5, 3, 1, 8, 8, generator=g)
    whole = ContingencyAccumulator([0.2, 0.9], 3)
    whole.update(pred, true)
    ranks = [ContingencyAccumulator([0.2, 0.9], 3) for _ in range(2)]
    ranks[0].update(pred[:3], true[:3])
    ranks[1].update(pred[3:], true[3:])
    reduced = ContingencyAccumulator([0.2, 0.9], 3)
    reduced.load_tensor(ranks[0].as_tensor(dtype) + ranks[1].as_tensor(dtype))  # all_reduce(SUM)
    assert reduced.counts.dtype == torch.int64
    assert torch.equal(reduced.counts, whole.counts)
    assert reduced.compute() == whole.compute()


def test_integer_and_half_data_count_like_float():
    g = torch.Generator().manual_seed(3)
    true = torch.randint(0, 256, (2, 4, 1, 16, 16), generator=g, dtype=torch.uint8)  # SEVIR-like
    pred = torch.randint(0, 256, (2, 4, 1, 16, 16), generator=g, dtype=torch.uint8)
    thresholds = [16, 74, 133, 160, 181, 219]
    as_uint8, as_float = ContingencyAccumulator(thresholds, 4), ContingencyAccumulator(thresholds, 4)
    as_uint8.update(pred, true)
    as_float.update(pred.double(), true.double())
    assert torch.equal(as_uint8.counts, as_float.counts)
    assert as_uint8.counts[:, :, 0].sum() > 0  # some hits, so the comparison means something
    as_half = ContingencyAccumulator(thresholds, 4)
    as_half.update(pred.half(), true.half())  # integers up to 256 are exact in float16
    assert torch.equal(as_half.counts, as_float.counts)


def test_bad_arguments():
    with pytest.raises(ValueError, match="differ"):
        ContingencyAccumulator([2, 2.0], 3)
    with pytest.raises(ValueError, match="at least one"):
        ContingencyAccumulator([], 3)
    acc = ContingencyAccumulator([1], 3)
    with pytest.raises(ValueError, match="call update"):
        acc.compute()
    with pytest.raises(ValueError, match="3 frames"):
        acc.update(torch.zeros(1, 2, 1, 4, 4), torch.zeros(1, 2, 1, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        acc.update(torch.zeros(1, 3, 1, 4, 4), torch.zeros(1, 3, 1, 4, 5))
    with pytest.raises(ValueError, match="counts"):
        acc.load_tensor(torch.zeros(5))


def random_scores_fixture():
    """Random float64 predictions with some values exactly at a threshold, and a lead time
    (index 2) whose truth never reaches 0.9, so POD and bias are undefined there."""
    g = torch.Generator().manual_seed(4)
    true = torch.rand(6, 5, 2, 12, 10, generator=g, dtype=torch.float64)
    pred = (true + 0.3 * torch.randn(true.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    true[:, 2] *= 0.8
    true[0, 0, 0, :3] = 0.5
    pred[1, 0, 0, :3] = 0.5
    return pred, true, [0.2, 0.5, 0.9]


def scored(pred, true, thresholds):
    acc = ContingencyAccumulator(thresholds, pred.shape[1])
    acc.update(pred[:4], true[:4])
    acc.update(pred[4:], true[4:])
    return acc.compute()


def assert_matches(ours, oracle):
    """ours: list with None; oracle: floats, nan or inf (x / 0) where undefined."""
    assert len(ours) == len(oracle)
    for mine, theirs in zip(ours, oracle):
        if mine is None:
            assert not math.isfinite(theirs)
        else:
            assert mine == pytest.approx(float(theirs), rel=1e-12, abs=1e-12)


def test_scores_equal_pysteps():
    verification = pytest.importorskip("pysteps.verification", reason="pysteps (oracle) not installed")
    pred, true, thresholds = random_scores_fixture()
    ours = scored(pred, true, thresholds)
    for t in thresholds:
        # pysteps' event is value > thr; the float64 just below t makes it value >= t
        table = verification.det_cat_fct_init(np.nextafter(t, -np.inf), axis=(0, 2, 3, 4))
        verification.det_cat_fct_accum(table, pred[:4].numpy(), true[:4].numpy())
        verification.det_cat_fct_accum(table, pred[4:].numpy(), true[4:].numpy())
        with np.errstate(divide="ignore", invalid="ignore"):  # x / 0 is the undefined case
            oracle = verification.det_cat_fct_compute(table, scores=["POD", "FAR", "CSI", "HSS", "BIAS"])
        entry = ours[threshold_key(t)]
        for name in NAMES:
            assert_matches(entry["per_frame"][name], oracle[name.upper()])
            defined = oracle[name.upper()][np.isfinite(oracle[name.upper()])]
            assert entry[name] == pytest.approx(float(defined.mean()), rel=1e-12)
    assert ours["0.9"]["per_frame"]["pod"][2] is None  # the undefined case was exercised


def test_csi_equals_torchmetrics():
    regression = pytest.importorskip("torchmetrics.functional.regression",
                                     reason="torchmetrics (oracle) not installed")
    pred, true, thresholds = random_scores_fixture()
    ours = scored(pred, true, thresholds)
    for t in thresholds:
        # the functional form over the whole set: the CriticalSuccessIndex module keeps one
        # row per update() when keep_sequence_dim is set, instead of summing the counts
        per_frame = regression.critical_success_index(pred, true, t, keep_sequence_dim=1)  # (T,)
        assert ours[threshold_key(t)]["per_frame"]["csi"] == pytest.approx(per_frame.tolist(), rel=1e-6)
        assert ours[threshold_key(t)]["csi"] == pytest.approx(per_frame.mean().item(), rel=1e-6)


def test_counts_equal_torchmetrics_stat_scores():
    classification = pytest.importorskip("torchmetrics.classification",
                                         reason="torchmetrics (oracle) not installed")
    pred, true, thresholds = random_scores_fixture()
    acc = ContingencyAccumulator(thresholds, pred.shape[1])
    acc.update(pred, true)
    for k, t in enumerate(thresholds):
        stats = classification.BinaryStatScores(multidim_average="samplewise")
        # one "sample" per lead time: (T, B * C * H * W)
        stats.update((pred >= t).transpose(0, 1).reshape(5, -1).long(),
                     (true >= t).transpose(0, 1).reshape(5, -1).long())
        tp, fp, tn, fn, _ = stats.compute().T  # each (T,)
        assert acc.counts[k].tolist() == torch.stack([tp, fp, fn, tn], dim=1).tolist()


# ---------------------------------------------------------------------------------------
# B-MSE, B-MAE and the balanced loss


def test_balance_weights_follow_hko7_bins():
    rain = torch.tensor([0, 1.99, 2, 4.9, 5, 9.99, 10, 29.9, 30, 100])
    assert balance_weights(rain).tolist() == [1, 1, 2, 2, 5, 5, 10, 10, 30, 30]
    assert BALANCE_THRESHOLDS == (2, 5, 10, 30) and BALANCE_WEIGHTS == (1, 2, 5, 10, 30)
    assert balance_weights(rain, [1], [0, 1]).tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert balance_weights(rain.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="need 3 weights"):
        balance_weights(rain, [1, 2], [1, 2])
    with pytest.raises(ValueError, match="increase"):
        balance_weights(rain, [2, 1], [1, 2, 3])


def test_balanced_errors_equal_hand_computation():
    # (B=2, T=2, C=1, H=1, W=3); weights from the truth: 1 below 2, 2 to 5, 5 to 10, 10 to 30, 30 up.
    true = torch.tensor([[[1, 3, 40], [0, 0, 0]], [[10, 10, 10], [6, 0, 0]]], dtype=torch.float32)
    pred = torch.tensor([[[2, 3, 38], [0.5, 0, 0]], [[10, 10, 11], [4, 0, 0]]], dtype=torch.float32)
    true, pred = true[:, :, None, None], pred[:, :, None, None]
    acc = BalancedErrorAccumulator(n_frames=2)
    acc.update(pred[:1], true[:1])
    acc.update(pred[1:], true[1:])
    # Frame sums: seq 0: 1*1 + 2*0 + 30*4 = 121 and 0.25; seq 1: 10*1 = 10 and 5*4 = 20.
    result = acc.compute()
    assert result["per_frame_b_mse"] == pytest.approx([(121 + 10) / 2, (0.25 + 20) / 2])
    assert result["per_frame_b_mae"] == pytest.approx([(61 + 10) / 2, (0.5 + 10) / 2])
    assert result["b_mse"] == pytest.approx(37.8125)
    assert result["b_mae"] == pytest.approx(20.375)

    reduced = BalancedErrorAccumulator(n_frames=2)
    reduced.load_tensor(acc.as_tensor())
    assert reduced.compute() == result


def test_balanced_loss_equals_hand_computation():
    # Training scale: thresholds already mapped to [0, 1].
    target = torch.tensor([0.1, 0.3, 0.6, 0.5]).reshape(1, 1, 1, 2, 2)
    pred = torch.tensor([0.2, 0.3, 0.4, 0.7]).reshape(1, 1, 1, 2, 2).requires_grad_()
    # weights 1, 3, 10, 10; errors 0.1, 0, -0.2, 0.2
    assert balanced_loss(pred, target, [0.25, 0.5], [1, 3, 10], mae=False).item() == pytest.approx(0.81 / 4)
    loss = balanced_loss(pred, target, [0.25, 0.5], [1, 3, 10])
    assert loss.item() == pytest.approx(0.81 / 4 + 4.1 / 4)
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    # With every weight 1 it is the plain MSE + L1 training loss.
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(2, 3, 1, 8, 8, generator=g), torch.rand(2, 3, 1, 8, 8, generator=g)
    assert balanced_loss(a, b, [0.5], [1, 1]).item() == pytest.approx(
        (F.mse_loss(a, b) + F.l1_loss(a, b)).item(), rel=1e-6)
    assert balanced_loss(a.bfloat16(), b, [0.5], [1, 1]).dtype == torch.float32


def test_rain_rate_to_dbz():
    assert rain_rate_to_dbz(1.0) == pytest.approx(10 * math.log10(58.53))  # Z = a at 1 mm/h
    assert rain_rate_to_dbz(0.5) == pytest.approx(12.98, abs=0.01)
    rates = torch.tensor([0.5, 2, 5, 10, 30], dtype=torch.float64)
    dbz = rain_rate_to_dbz(rates)
    assert dbz.tolist() == pytest.approx([rain_rate_to_dbz(float(r)) for r in rates])
    assert torch.all(dbz.diff() > 0)


ACCELERATORS = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
                pytest.param("mps", marks=pytest.mark.skipif(not torch.backends.mps.is_available(), reason="no MPS"))]


@pytest.mark.parametrize("device", ACCELERATORS)
def test_accelerator_counts_equal_cpu(device):
    pred, true, thresholds = random_scores_fixture()
    pred, true = pred.float(), true.float()  # MPS has no float64
    on_cpu, on_device = ContingencyAccumulator(thresholds, 5), ContingencyAccumulator(thresholds, 5)
    on_cpu.update(pred, true)
    on_device.update(pred.to(device), true.to(device))
    assert torch.equal(on_cpu.counts, on_device.counts)
    errors = BalancedErrorAccumulator(5)
    errors.update(pred.to(device), true.to(device))
    loss = balanced_loss(pred.to(device), true.to(device), [0.5], [1, 2])
    assert loss.device.type == device and errors.totals.device.type == "cpu"


def test_imports_only_torch():
    # evaluation under torchrun imports this; it must not pull in pictures, SSIM or OpenCV
    code = "import sys, nowcast; print(sorted({'utils', 'PIL', 'skimage', 'cv2'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
