import io
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

import checkpoints
import devices
import metrics
import pictures
import utils


def _videos(b=3, t=4, c=1, h=16, w=16, seed=0):
    """Random target in [0, 1] and a prediction that strays outside it, (B, T, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, t, c, h, w, generator=g)
    pred = target + 0.4 * torch.randn(b, t, c, h, w, generator=g)
    return pred, target


def _reference(pred, target):
    """Per-frame metrics written straight from the definitions in REFERENCES.md."""
    p = pred.double().numpy()
    y = target.double().numpy()
    rows = {"mse": [], "mae": [], "ssim": [], "psnr": [], "ssim_openstl": []}
    for i in range(p.shape[0]):
        for j in range(p.shape[1]):
            raw, true = p[i, j], y[i, j]  # (C, H, W)
            clip = np.clip(raw, 0, 1)
            rows["mse"].append(((raw - true) ** 2).sum())
            rows["mae"].append(np.abs(raw - true).sum())
            # OpenSTL's convention: float32 frames, data_range 2 (docs/metrics.md)
            clip32, true32 = clip.astype(np.float32), true.astype(np.float32)
            if raw.shape[0] == 1:
                rows["ssim"].append(structural_similarity(clip[0], true[0], data_range=1.0))
                rows["ssim_openstl"].append(structural_similarity(clip32[0], true32[0], data_range=2.0))
            else:  # channel-last, unlike utils, so the two paths differ
                rows["ssim"].append(structural_similarity(clip.transpose(1, 2, 0), true.transpose(1, 2, 0),
                                                          data_range=1.0, channel_axis=-1))
                rows["ssim_openstl"].append(structural_similarity(
                    clip32.transpose(1, 2, 0), true32.transpose(1, 2, 0), data_range=2.0, channel_axis=-1))
            rows["psnr"].append(10 * np.log10(1 / np.mean((clip - true) ** 2)))
    means = {k: float(np.mean(v)) for k, v in rows.items()}
    means["per_frame_mse"] = np.array(rows["mse"]).reshape(p.shape[:2]).mean(0)
    return means


@pytest.mark.parametrize("channels", [1, 3])
def test_metrics_match_reference(channels):
    pred, target = _videos(c=channels)
    acc = metrics.MetricAccumulator(4)
    acc.update(pred, target)
    got, want = acc.compute(), _reference(pred, target)
    for key in ("mse", "mae", "ssim", "psnr", "ssim_openstl"):
        assert got[key] == pytest.approx(want[key], abs=1e-6, rel=1e-9), key
    np.testing.assert_allclose(got["per_frame_mse"], want["per_frame_mse"], rtol=1e-9)
    assert acc.count == 3 and acc.totals.shape == (5, 4) and acc.totals.dtype == torch.float64


def test_two_batches_equal_one():
    pred, target = _videos(b=6)
    whole, split = metrics.MetricAccumulator(4), metrics.MetricAccumulator(4)
    whole.update(pred, target)
    split.update(pred[:2], target[:2])
    split.update(pred[2:], target[2:])
    assert split.count == whole.count == 6
    torch.testing.assert_close(split.totals, whole.totals, rtol=1e-12, atol=1e-12)


def test_tensor_round_trip_and_sum_like_all_reduce():
    pred, target = _videos(b=6)
    whole, first, second = (metrics.MetricAccumulator(4) for _ in range(3))
    whole.update(pred, target)
    first.update(pred[:3], target[:3])
    second.update(pred[3:], target[3:])

    flat = whole.as_tensor()
    assert flat.shape == (5 * 4 + 1,) and flat.dtype == torch.float64
    restored = metrics.MetricAccumulator(4)
    restored.load_tensor(flat)
    assert restored.compute() == whole.compute()

    reduced = metrics.MetricAccumulator(4)
    reduced.load_tensor(first.as_tensor() + second.as_tensor())
    assert reduced.count == 6
    got, want = reduced.compute(), whole.compute()
    for key in ("mse", "mae", "ssim", "psnr", "ssim_openstl"):
        assert got[key] == pytest.approx(want[key], rel=1e-12)

    with pytest.raises(ValueError, match="21"):
        metrics.MetricAccumulator(4).load_tensor(torch.zeros(5))


def test_score_set_sums_like_one_process_in_data_units():
    """ScoreSet: the field's metrics in the data's units (MSE scales with the range squared,
    SSIM and PSNR don't), nowcasting counts and B-MSE; halves summed as all_reduce would."""
    g = torch.Generator().manual_seed(2)
    pred, target = torch.rand(4, 3, 1, 8, 8, generator=g), torch.rand(4, 3, 1, 8, 8, generator=g)
    lo, hi = -10.0, 60.0
    p_units, t_units = lo + (hi - lo) * pred, lo + (hi - lo) * target
    options = dict(value_range=(lo, hi), thresholds=[5.0, 30.0], balance=([0.0, 20.0], [1.0, 2.0, 4.0]))
    whole = metrics.ScoreSet(3, **options)
    whole.update(p_units, t_units)
    halves = [metrics.ScoreSet(3, **options) for _ in range(2)]
    halves[0].update(p_units[:1], t_units[:1])
    halves[1].update(p_units[1:], t_units[1:])
    reduced = metrics.ScoreSet(3, **options)
    reduced.load_tensor(halves[0].as_tensor() + halves[1].as_tensor())
    got, want = reduced.compute(), whole.compute()
    assert got["thresholds"] == want["thresholds"]  # counts: exact
    for key in ("mse", "mae", "ssim", "psnr", "b_mse", "b_mae"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    unit = metrics.MetricAccumulator(3)
    unit.update(pred, target)
    unit = unit.compute()
    assert want["mse"] == pytest.approx(unit["mse"] * (hi - lo) ** 2, rel=1e-6)  # float32 inputs
    assert want["mae"] == pytest.approx(unit["mae"] * (hi - lo), rel=1e-6)
    for key in ("ssim", "psnr", "ssim_openstl"):
        assert want[key] == pytest.approx(unit[key], rel=1e-6), key
    with pytest.raises(ValueError, match=r"value range \[-10, 60\]"):
        whole.update(p_units, t_units + 100)


def test_clipping_for_ssim_psnr_but_not_mse_mae():
    target = torch.ones(1, 1, 1, 8, 8)
    pred = torch.full_like(target, 1.5)  # clipped, this is a perfect prediction
    acc = metrics.MetricAccumulator(1)
    acc.update(pred, target)
    m = acc.compute()
    assert m["mse"] == pytest.approx(0.25 * 64)
    assert m["mae"] == pytest.approx(0.5 * 64)
    assert m["ssim"] == pytest.approx(1.0)
    assert m["psnr"] == pytest.approx(10 * np.log10(1 / metrics.PSNR_MIN_MSE))  # capped, not inf
    assert torch.all(pred == 1.5)  # the caller's tensor is untouched


@pytest.mark.parametrize("k", [0, 1, 17, 64])
def test_all_zero_prediction_against_k_ones(k):
    target = torch.zeros(2, 3, 1, 8, 8)
    target.view(2, 3, -1)[..., :k] = 1.0
    acc = metrics.MetricAccumulator(3)
    acc.update(torch.zeros_like(target), target)
    m = acc.compute()
    assert m["mse"] == k and m["mae"] == k
    assert m["per_frame_mse"] == [k, k, k]


def test_update_rejects_bad_input():
    acc = metrics.MetricAccumulator(4)
    pred, target = _videos()
    with pytest.raises(ValueError, match="shape"):
        acc.update(pred, target[:, :3])
    with pytest.raises(ValueError, match="4 frames"):
        acc.update(pred[:, :3], target[:, :3])
    with pytest.raises(ValueError, match="255"):
        acc.update(pred, target * 255)
    with pytest.raises(ValueError, match="too small"):
        acc.update(pred[..., :5, :5], target[..., :5, :5])
    with pytest.raises(ValueError, match="update"):
        acc.compute()


def test_copy_last_frame():
    inputs = torch.rand(2, 5, 1, 8, 8)
    out = metrics.copy_last_frame(inputs, 3)
    assert out.shape == (2, 3, 1, 8, 8)
    for t in range(3):
        assert torch.equal(out[:, t], inputs[:, -1])


def _grid_videos(c=1):
    g = torch.Generator().manual_seed(1)
    inputs = torch.rand(3, 5, c, 8, 8, generator=g)
    targets = torch.rand(3, 3, c, 8, 8, generator=g)
    preds = torch.rand(3, 3, c, 8, 8, generator=g)
    preds[0, 0, :, 0, 0] = 2.0  # must show as white, not wrap around
    return inputs, targets, preds


def test_prediction_grid_layout():
    inputs, targets, preds = _grid_videos()
    grid = pictures.prediction_grid(inputs, targets, preds, max_sequences=2, pad=2)
    # 2 sequences x 3 rows of 8 px, 2 px between rows, 6 px between sequences; 5 columns
    assert grid.shape == (2 + 6 * (8 + 2) + 4, 2 + 5 * (8 + 2))
    assert grid.dtype == np.uint8
    for col in range(3):
        x = 2 + col * 10
        cell = grid[2 + 2 * 10:2 + 2 * 10 + 8, x:x + 8]  # sequence 0, prediction row
        want = np.rint(preds[0, col, 0].clamp(0, 1).numpy() * 255).astype(np.uint8)
        np.testing.assert_array_equal(cell, want)
    assert grid[22, 2] == 255
    # the truth row has 3 frames, so columns 4 and 5 are background
    assert np.all(grid[12:20, 32:] == pictures.BACKGROUND)
    # sequence 1's input row starts after the wider gap
    want = np.rint(inputs[1, 4, 0].numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(grid[36:44, 42:50], want)


def test_prediction_grid_rgb_and_numpy():
    inputs, targets, preds = (x.numpy() for x in _grid_videos(c=3))
    grid = pictures.prediction_grid(inputs, targets, preds, max_sequences=4, pad=1)
    assert grid.shape == (1 + 9 * (8 + 1) + 2 * 2, 1 + 5 * 9, 3)
    with pytest.raises(ValueError, match="channels"):
        pictures.prediction_grid(inputs[:, :, :0], targets[:, :, :0], preds[:, :, :0])


@pytest.mark.parametrize("channels", [2, 4])
def test_other_channel_counts_draw_gray_rows_per_channel(tmp_path, channels):
    """Each channel gets its own input, truth and prediction rows, in that order."""
    inputs, targets, preds = _grid_videos(c=channels)
    grid = pictures.prediction_grid(inputs, targets, preds, max_sequences=2, pad=2)
    rows = 3 * channels
    assert grid.shape == (2 + 2 * rows * (8 + 2) + 4, 2 + 5 * (8 + 2))  # gray: 2-D
    for k in range(channels):
        for r, video in enumerate((inputs, targets, preds)):
            top = 2 + (3 * k + r) * 10
            cell = grid[top:top + 8, 2:10]  # sequence 0, first frame
            want = np.rint(video[0, 0, k].clamp(0, 1).numpy() * 255).astype(np.uint8)
            np.testing.assert_array_equal(cell, want)
    top = 2 + rows * 10 + 4  # sequence 1 starts after the wider gap
    np.testing.assert_array_equal(grid[top:top + 8, 2:10],
                                  np.rint(inputs[1, 0, 0].numpy() * 255).astype(np.uint8))

    pictures.save_prediction_figure(tmp_path / "f.png", inputs, targets, preds, max_sequences=2)
    with Image.open(tmp_path / "f.png") as img:
        assert img.size[1] == 2 * grid.shape[0]
    pictures.save_prediction_gif(tmp_path / "f.gif", inputs, targets, preds, max_sequences=2)
    with Image.open(tmp_path / "f.gif") as img:
        assert img.n_frames == 5 + 3
        img.seek(5)  # the first truth | prediction frame: one pair of cells per channel
        frame = np.asarray(img.convert("L"))
    one = pictures.save_prediction_gif  # the same picture of a single channel is 1 row high
    one(tmp_path / "one.gif", inputs[:, :, :1], targets[:, :, :1], preds[:, :, :1], max_sequences=2)
    with Image.open(tmp_path / "one.gif") as img:
        header = img.size[1] - (8 * 2 + 2 * 2)
    assert frame.shape[0] == header + channels * (8 * 2 + 2 * 2)
    for k in range(channels):  # channel k's truth, enlarged twice, in row k
        y = header + k * (8 * 2 + 2 * 2)
        want = np.rint(targets[0, 0, k].numpy() * 255).astype(np.uint8).repeat(2, 0).repeat(2, 1)
        np.testing.assert_array_equal(frame[y:y + 16, 4:20], want)


def test_save_prediction_figure(tmp_path):
    inputs, targets, preds = _grid_videos()
    path = tmp_path / "new" / "dir" / "figure.png"
    pictures.save_prediction_figure(path, inputs, targets, preds, max_sequences=2, pad=2, scale=2)
    grid = pictures.prediction_grid(inputs, targets, preds, max_sequences=2, pad=2)
    with Image.open(path) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img)
    margin = pixels.shape[1] - 2 * grid.shape[1]
    assert pixels.shape[0] == 2 * grid.shape[0] and margin > 0
    np.testing.assert_array_equal(pixels[:, margin:], grid.repeat(2, 0).repeat(2, 1))
    assert pixels[:, :margin].min() < 100  # labels were drawn
    assert os.listdir(path.parent) == ["figure.png"]


@pytest.mark.parametrize("channels", [1, 3])
def test_save_prediction_gif(tmp_path, channels):
    inputs, targets, preds = _grid_videos(c=channels)
    path = tmp_path / "gifs" / "pred.gif"
    pictures.save_prediction_gif(path, inputs, targets, preds, max_sequences=2, duration_ms=100)
    with Image.open(path) as img:
        assert img.format == "GIF"
        assert img.n_frames == 5 + 3
        img.seek(img.n_frames - 1)
        assert img.info["duration"] == 100
    assert os.listdir(path.parent) == ["pred.gif"]


def test_atomic_save_load_checkpoint_round_trip(tmp_path):
    ckpt = {"model": {"w": torch.randn(3, 4)}, "config": {"preset": "tiny", "lr": 1e-4},
            "iteration": 7, "rng": utils.rng_state()}
    path = tmp_path / "run" / "ckpt.pt"
    checkpoints.atomic_save(ckpt, path)
    loaded = checkpoints.load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], ckpt["model"]["w"])
    assert loaded["config"] == ckpt["config"] and loaded["iteration"] == 7
    assert os.listdir(path.parent) == ["ckpt.pt"]


def _write_text(path):
    path.write_text("model: not a checkpoint\n")


def _write_random(path):
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _write_empty(path):
    path.write_bytes(b"")


def _write_no_config(path):
    torch.save({"model": {}}, path)


def _write_list(path):
    torch.save([torch.zeros(1)], path)


@pytest.mark.parametrize("write, problem", [
    (_write_text, "torch.load failed"),
    (_write_random, "torch.load failed"),
    (_write_empty, "torch.load failed"),
    (_write_no_config, "config"),
    (_write_list, "expected a dict"),
    (None, "no such file"),
])
def test_load_checkpoint_rejects(tmp_path, write, problem):
    path = tmp_path / "bad.pt"
    if write is not None:
        write(path)
    with pytest.raises(ValueError) as info:
        checkpoints.load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "not a checkpoint written by main.py" in message
    assert problem in message
    assert "\n" not in message


def test_failed_save_keeps_existing_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoints.atomic_save({"model": {}, "config": {"v": 1}}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        checkpoints.atomic_save({"model": {}, "config": {"fn": lambda x: x}}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temporary file is gone too
    assert checkpoints.load_checkpoint(path)["config"] == {"v": 1}


def test_rng_state_survives_save_and_load():
    utils.seed_everything(123)
    buffer = io.BytesIO()
    torch.save({"rng": utils.rng_state()}, buffer)
    expected, expected_np = torch.rand(5), np.random.standard_normal(5)
    torch.rand(100)  # move the generators on
    np.random.standard_normal(101)
    buffer.seek(0)
    utils.set_rng_state(torch.load(buffer, weights_only=True)["rng"])
    assert torch.equal(torch.rand(5), expected)
    assert np.array_equal(np.random.standard_normal(5), expected_np)


def test_pick_device():
    assert devices.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device name"):
        devices.pick_device("gpu")
    if torch.cuda.is_available():
        assert devices.pick_device("auto").type == "cuda"
    else:
        with pytest.raises(ValueError, match=re.escape("torch.cuda.is_available() is False")):
            devices.pick_device("cuda")
        if not torch.backends.mps.is_available():
            assert devices.pick_device("auto") == torch.device("cpu")


def test_format_metrics_table():
    table = metrics.format_metrics_table({
        "model": {"mse": 23.456, "mae": 72.8, "ssim": 0.94621, "psnr": 21.3, "ssim_openstl": 0.95,
                  "per_frame_mse": [1.0]},
        "copy_last_baseline": {"mse": 307.0, "mae": 360.0, "ssim": 0.64},
    })
    lines = table.splitlines()
    assert lines[0].split() == ["model", "mse", "mae", "ssim", "psnr", "ssim_openstl"]
    assert lines[2].split() == ["model", "23.46", "72.80", "0.9462", "21.30", "0.9500"]
    assert lines[3].split() == ["copy_last_baseline", "307.00", "360.00", "0.6400", "-", "-"]
    assert len({len(line) for line in lines}) == 1  # columns line up


def test_one_evaluation_loop_scores_model_and_baselines():
    """metrics.score: the model's metrics and loss, a baseline's, the first batch, restored mode."""
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.rand(5, 3, 1, 8, 8, generator=g), torch.rand(5, 2, 1, 8, 8, generator=g)
    loader = [(inputs[:3], targets[:3]), (inputs[3:], targets[3:])]

    class Half(torch.nn.Module):
        def forward(self, x, frames_output):
            return x[:, -1:].repeat(1, frames_output, 1, 1, 1) * 0.5

    model = Half().train()
    scores = metrics.score(model, loader, torch.device("cpu"), devices.autocast_context(
        torch.device("cpu"), "none"), 2, baselines={"copy": metrics.copy_last_frame})
    assert model.training and scores.sequences == 5
    half, copy = metrics.MetricAccumulator(2), metrics.MetricAccumulator(2)
    half.update(inputs[:, -1:].repeat(1, 2, 1, 1, 1) * 0.5, targets)
    copy.update(metrics.copy_last_frame(inputs, 2), targets)
    for name, want in (("model", half), ("copy", copy)):
        got = scores.metrics[name].compute()
        for key in metrics.METRIC_NAMES:
            assert got[key] == pytest.approx(want.compute()[key], rel=1e-12), (name, key)
    assert scores.loss == pytest.approx(((inputs[:, -1:] * 0.5 - targets) ** 2).mean().item())
    assert torch.equal(scores.first_batch[0], inputs[:3])
