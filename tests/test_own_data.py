"""Your own sequences end to end (issue 20): layouts, HDF5, the data's own units, any channel
count and frame size, the nowcasting scores and the optical-flow baseline in main.py and
evaluate.py; and the data faults of issue 21 that live in the same code."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import evaluate
import main
from checkpoints import load_checkpoint
from data import arrays
from data.mm import make_test_set
from helpers import said
from metrics import MetricAccumulator
from model import InDataUnits, build_model, fit_to_data, load_model
from nowcast import ContingencyAccumulator, rain_rate_to_dbz
from utils import UsageError, run_cli

REPO = Path(__file__).resolve().parents[1]


def tiny(run_dir, *extra):
    """A run of 3 + 3 frames, batch 2, a few steps an epoch, one epoch unless `extra` says."""
    return ["--arch", "tiny", "--device", "cpu", "--out-dir", str(run_dir), "--workers", "0",
            "--batch-size", "2", "--log-every", "1", "--frames-input", "3", "--frames-output", "3",
            "--schedule", "plateau", "--amp", "none", "--epochs", "1", *extra]


def lines(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def same_numbers(a, b):
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] and a
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "seconds"} == \
            {k: v for k, v in y.items() if k != "seconds"}


def blobs(n, t, c=1, h=32, w=32, seed=0, high=70.0):
    """(N, T, C, H, W) float32 Gaussian blobs drifting right, peak `high`: radar-like echoes."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    out = np.zeros((n, t, c, h, w), np.float32)
    for i in range(n):
        for k in range(c):
            y0, x0, r = rng.uniform(8, h - 8), rng.uniform(4, w / 2), rng.uniform(3, 6)
            for j in range(t):
                out[i, j, k] = high * np.exp(-((ys - y0) ** 2 + (xs - x0 - 1.5 * j) ** 2) / (2 * r * r))
    return out


# ----------------------------------------------------------------------------------------
# Layouts and files

@pytest.mark.parametrize("layout", ["NTHW", "TNHW", "NHWT", "NTCHW", "NCTHW", "HWTNC"])
def test_any_layout_reads_as_n_t_c_h_w(tmp_path, layout):
    seqs = np.random.default_rng(0).integers(0, 256, (3, 5, 2 if "C" in layout else 1, 8, 12),
                                             dtype=np.uint8)  # (N, T, C, H, W)
    axes = [a for a in "NTCHW" if a in layout]
    stored = seqs if "C" in layout else seqs[:, :, 0]
    stored = stored.transpose([axes.index(a) for a in layout])  # the file's order
    np.save(tmp_path / "s.npy", stored)
    view = arrays.load_sequences(tmp_path / "s.npy", layout.lower())
    assert view.shape == seqs.shape
    np.testing.assert_array_equal(view, seqs)
    np.testing.assert_array_equal(view[2, 1:4], seqs[2, 1:4])


@pytest.fixture
def h5py():
    return pytest.importorskip("h5py", reason="h5py (optional) not installed")


def test_hdf5_reads_lazily_in_its_layout_and_in_workers(tmp_path, h5py):
    seqs = np.random.default_rng(1).random((6, 7, 1, 16, 24), dtype=np.float32)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("group/vil", data=seqs[:, :, 0].transpose(0, 2, 3, 1))  # SEVIR's NHWT
        f.create_dataset("id", data=np.arange(6))
    view = arrays.load_sequences(f"{tmp_path / 'd.h5'}:group/vil", "NHWT")
    assert isinstance(view, arrays.Reordered) and view.shape == seqs.shape
    np.testing.assert_array_equal(view[4, 2:5], seqs[4, 2:5])  # one block read, reordered
    np.testing.assert_array_equal(np.asarray(view), seqs)
    dataset = arrays.SequenceArrayDataset(view, 3, 4)
    loaded = [torch.cat(batch, 1) for batch in DataLoader(dataset, batch_size=2, num_workers=2)]
    torch.testing.assert_close(torch.cat(loaded), torch.from_numpy(seqs), rtol=0, atol=0)
    # A spec without its dataset names what the file holds; a wrong name too.
    for spec, words in ((tmp_path / "d.h5", "name the dataset as"), (f"{tmp_path / 'd.h5'}:vil", "no dataset 'vil'")):
        with pytest.raises(UsageError) as err:
            arrays.load_sequences(spec)
        assert words in str(err.value) and "group/vil float32 (6, 16, 24, 7)" in str(err.value)


def test_an_hdf5_file_without_its_dataset_is_one_line_before_any_run_folder(tmp_path, h5py, capsys):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("radar/dbz", data=np.zeros((4, 8, 16, 16), np.float32))
    for spec, words in ((tmp_path / "d.h5", f"{tmp_path / 'd.h5'}: name the dataset as {tmp_path / 'd.h5'}:DATASET"),
                        (f"{tmp_path / 'd.h5'}:dbz", f"{tmp_path / 'd.h5'} has no dataset 'dbz'")):
        argv = tiny(tmp_path / "run", "--train-data", str(spec), "--layout", "NTHW")
        assert run_cli(main.main, argv) == 1
        err = said(capsys.readouterr().err)
        assert len(err) == 1 and words in err[0] and "radar/dbz float32 (4, 8, 16, 16)" in err[0], err
        assert not (tmp_path / "run").exists()


def test_missing_h5py_is_one_line_before_any_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` now raises ImportError
    argv = tiny(tmp_path / "run", "--train-data", f"{tmp_path / 'd.h5'}:vil", "--layout", "NHWT")
    assert run_cli(main.main, argv) == 1
    err = said(capsys.readouterr().err)
    assert err == [f"error: {tmp_path / 'd.h5'}:vil: needs h5py to read HDF5: pip install h5py"]
    assert not (tmp_path / "run").exists()


def test_hdf5_trains_like_the_same_data_in_npy(tmp_path, h5py):
    """Metric for metric, with the HDF5 file read by two worker processes over two epochs."""
    seqs = (blobs(8, 6, seed=2) / 70).astype(np.float32)  # (N, T, 1, H, W) in [0, 1]
    np.save(tmp_path / "d.npy", seqs[:, :, 0])
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("frames", data=seqs[:, :, 0].transpose(0, 2, 3, 1), chunks=(1, 32, 32, 6))
    main.main(tiny(tmp_path / "npy", "--train-data", str(tmp_path / "d.npy"), "--layout", "NTHW",
                   "--epochs", "2", "--thresholds", "0.3"))
    main.main(tiny(tmp_path / "h5", "--train-data", f"{tmp_path / 'd.h5'}:frames", "--layout", "NHWT",
                   "--epochs", "2", "--thresholds", "0.3", "--workers", "2"))
    same_numbers(lines(tmp_path / "npy"), lines(tmp_path / "h5"))


def test_a_make_test_set_file_trains_by_its_layout(tmp_path, mnist_root, capsys):
    """(T, N, H, W) as make-test-set writes it: refused without --layout, and with --layout
    TNHW the same run as its (N, T, H, W) transpose."""
    made = make_test_set(mnist_root, 6, n_frames=6, image_size=32, download=False)  # (T, N, H, W)
    np.save(tmp_path / "tnhw.npy", made)
    np.save(tmp_path / "nthw.npy", made.transpose(1, 0, 2, 3))
    assert run_cli(main.main, tiny(tmp_path / "refused", "--train-data", str(tmp_path / "tnhw.npy"))) == 1
    assert "TNHW (make-test-set's" in said(capsys.readouterr().err)[0] and not (tmp_path / "refused").exists()
    main.main(tiny(tmp_path / "tnhw", "--train-data", str(tmp_path / "tnhw.npy"), "--layout", "TNHW"))
    main.main(tiny(tmp_path / "nthw", "--train-data", str(tmp_path / "nthw.npy"), "--layout", "NTHW"))
    same_numbers(lines(tmp_path / "tnhw"), lines(tmp_path / "nthw"))
    assert json.loads((tmp_path / "tnhw" / "config.json").read_text())["layout"] == "TNHW"


def test_a_preset_fits_any_channel_count_and_frame_size():
    model = build_model("tiny", channels=4, size=(48, 64))
    assert model.preset.image_size == [48, 64] and model.preset.frame_channels == 4
    x = torch.rand(2, 3, 4, 48, 64)
    assert model(x, frames_output=2).shape == (2, 2, 4, 48, 64)
    assert build_model("tiny").preset.stages[0].down.in_channels == 1  # the preset itself stays
    with pytest.raises(UsageError) as err:  # 60 / 4 = 15 px reach stage 2's stride 2
        fit_to_data("tiny", 3, (48, 60))
    assert str(err.value).startswith("stage 2: stride 2 does not divide the 12x15 map it gets")


def test_a_resumed_run_refuses_frames_its_model_was_not_fitted_to(tmp_path, capsys):
    np.save(tmp_path / "a.npy", blobs(6, 6, seed=6) / 70)
    np.save(tmp_path / "b.npy", blobs(6, 6, h=40, w=40, seed=6) / 70)
    main.main(tiny(tmp_path / "run", "--train-data", str(tmp_path / "a.npy")))
    argv = tiny(tmp_path / "run", "--train-data", str(tmp_path / "b.npy"), "--epochs", "2", "--resume")
    assert run_cli(main.main, argv) == 1  # --train-data may move on resume, its frames may not change
    assert "was fitted to 1x32x32" in said(capsys.readouterr().err)[0]
    assert [r["epoch"] for r in lines(tmp_path / "run")] == [1]


# ----------------------------------------------------------------------------------------
# Values: units, clipping, NaNs

def test_values_are_clipped_with_one_warning_and_nans_filled(tmp_path):
    data = blobs(4, 5, seed=3)
    data[0, 0, 0, :2, :3] = -5.0  # 6 below
    data[1, 2, 0, 0, 0] = 90.0    # 1 above
    data[2, 1, 0, 5, 5] = np.nan
    np.save(tmp_path / "dbz.npy", data)
    with pytest.raises(UsageError, match=r"dbz\.npy: 1 of 20,480 values are NaN"):
        arrays.load_sequences(tmp_path / "dbz.npy", value_range=(0, 70))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seqs = arrays.load_sequences(tmp_path / "dbz.npy", value_range=(0, 70), fill_nan=0.0)
    assert len(caught) == 1 and "7 of 20,480 values lie outside the value range [0, 70]" in str(caught[0].message)
    x, y = arrays.SequenceArrayDataset(seqs, 2, 3, value_range=(0, 70), fill_nan=0.0)[0]
    assert x[0, 0, 0, 0] == 0 and y.dtype == torch.float32  # clipped, in dBZ
    x, y = arrays.SequenceArrayDataset(seqs, 2, 3, value_range=(0, 70), fill_nan=12.5)[2]
    assert x[1, 0, 5, 5] == 12.5
    torch.testing.assert_close(y, torch.from_numpy(data[2, 2:]).clamp(0, 70))  # the data's own values
    # int16 radar counts need a value range; uint8 without one is 0-255 -> [0, 1]
    with pytest.raises(UsageError, match="dtype int16; expected uint8 .* or give --value-range"):
        arrays.load_sequences(np.zeros((2, 5, 8, 8), np.int16))
    assert arrays.load_sequences(np.zeros((2, 5, 8, 8), np.int16), value_range=(-100, 500)).shape == (2, 5, 1, 8, 8)


@pytest.fixture(scope="module")
def dbz_run(tmp_path_factory):
    """float32 dBZ 0..70 (some values outside), trained with --value-range 0 70 and thresholds."""
    root = tmp_path_factory.mktemp("dbz")
    data = blobs(10, 6, seed=4)
    data[0, 0, 0, 0, :4] = 80.0  # clipped, with a warning
    np.save(root / "dbz.npy", data)
    with pytest.warns(UserWarning, match="4 of .* values lie outside the value range"):
        main.main(tiny(root / "run", "--train-data", str(root / "dbz.npy"), "--layout", "NTCHW",
                       "--value-range", "0", "70", "--thresholds", "20", "35", "--balanced",
                       "--balance-thresholds", *(f"{rain_rate_to_dbz(r):.2f}" for r in (2, 5, 10, 30)),
                       "--loss", "b-mse+b-mae", "--epochs", "2"))
    return root, data


def test_value_range_is_stored_and_validation_has_nowcasting_scores(dbz_run):
    root, _ = dbz_run
    config = json.loads((root / "run" / "config.json").read_text())
    assert config["value_range"] == [0.0, 70.0] and config["layout"] == "NTCHW"
    assert load_checkpoint(root / "run" / "checkpoints" / "best.pt")["config"]["value_range"] == [0.0, 70.0]
    assert config["epoch_size"] == 9 and config["val_size"] == 1  # the file's split, recorded
    record = lines(root / "run")[-1]
    assert set(record["thresholds"]) == {"20", "35"}
    scores = record["thresholds"]["20"]
    assert set(scores) == {"pod", "far", "csi", "hss", "bias", "per_frame"}
    assert len(scores["per_frame"]["csi"]) == 3 and record["b_mse"] > record["mse"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(root / "run"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/csi@20", "val/hss@35", "val/b_mse", "val/b_mae"} <= tags
    if scores["csi"] is not None:
        assert events.Scalars("val/csi@20")[-1].value == pytest.approx(scores["csi"])


def test_scores_and_predictions_come_back_in_the_data_units(dbz_run, tmp_path):
    root, data = dbz_run
    best = root / "run" / "checkpoints" / "best.pt"
    report = evaluate.main(["--checkpoint", str(best), "--device", "cpu", "--test-set", str(root / "dbz.npy"),
                            "--layout", "NTCHW", "--thresholds", "20", "35", "--batch-size", "10",
                            "--json", str(tmp_path / "scores.json")])
    assert report["value_range"] == [0.0, 70.0]
    truth = torch.from_numpy(data).clamp(0, 70)  # (N, T, C, H, W) dBZ, as the run clips it
    model = load_model(best)
    assert isinstance(model, InDataUnits)
    with torch.no_grad():
        pred = model(truth[:, :3], frames_output=3)
        unit = load_model(best, data_units=False)(truth[:, :3] / 70, frames_output=3)
    torch.testing.assert_close(pred, unit * 70)  # the network's [0, 1], in dBZ
    # evaluate.py's scores equal ones computed here from load_model's dBZ predictions
    metrics, counts = MetricAccumulator(3, (0, 70)), ContingencyAccumulator([20, 35], 3)
    for acc in (metrics, counts):
        acc.update(pred, truth[:, 3:])
    assert report["model"]["mse"] == pytest.approx(metrics.compute()["mse"], rel=1e-5)
    assert report["model"]["thresholds"]["35"]["per_frame"]["hss"] == \
        pytest.approx(counts.compute()["35"]["per_frame"]["hss"], rel=1e-9)
    # copy-last in dBZ, by hand: per-frame squared error summed over pixels
    copy_mse = ((truth[:, 2:3] - truth[:, 3:]) ** 2).sum((2, 3, 4)).mean().item()
    assert report["copy_last_baseline"]["mse"] == pytest.approx(copy_mse, rel=1e-6)
    assert copy_mse > 70  # dBZ squared, not [0, 1]
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert set(saved["copy_last_baseline"]["thresholds"]) == {"20", "35"}


def test_flow_baseline_is_scored_beside_the_model_with_every_score(dbz_run, tmp_path):
    pytest.importorskip("cv2", reason="OpenCV (optional) not installed")
    root, _ = dbz_run
    report = evaluate.main(["--checkpoint", str(root / "run" / "checkpoints" / "last.pt"), "--device", "cpu",
                            "--test-set", str(root / "dbz.npy"), "--thresholds", "20",
                            "--baselines", "copy-last,optical-flow", "--balanced",
                            "--json", str(tmp_path / "s.json")])
    saved = json.loads((tmp_path / "s.json").read_text())
    assert report["baselines"] == ["copy-last", "optical-flow"]
    for key in ("model", "copy_last_baseline", "optical_flow_baseline"):
        assert {"mse", "ssim", "b_mse", "b_mae", "thresholds"} <= set(saved[key]), key
        assert set(saved[key]["thresholds"]["20"]["per_frame"]) == {"pod", "far", "csi", "hss", "bias"}
    # the blobs drift 1.5 px a frame: extrapolating their motion beats standing still
    assert saved["optical_flow_baseline"]["mse"] < 0.5 * saved["copy_last_baseline"]["mse"]
    assert saved["balance"]["thresholds"] == pytest.approx([rain_rate_to_dbz(r) for r in (2, 5, 10, 30)], abs=0.01)


def test_missing_opencv_is_one_line_before_any_work(dbz_run, tmp_path, monkeypatch, capsys):
    root, _ = dbz_run
    monkeypatch.setitem(sys.modules, "cv2", None)
    monkeypatch.setattr(evaluate, "load_checkpoint", lambda *a: pytest.fail("work started"))
    argv = ["--checkpoint", str(root / "run" / "checkpoints" / "last.pt"), "--test-set", str(root / "dbz.npy"),
            "--baselines", "optical-flow", "--json", str(tmp_path / "s.json")]
    assert run_cli(evaluate.main, argv) == 1
    err = said(capsys.readouterr().err)
    assert len(err) == 1 and "--baselines optical-flow" in err[0] and "opencv-python-headless" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_a_run_on_own_data_needs_its_test_set_and_its_frame_size(dbz_run, tmp_path, capsys):
    root, data = dbz_run
    best = str(root / "run" / "checkpoints" / "best.pt")
    common = ["--checkpoint", best, "--device", "cpu", "--figure", str(tmp_path / "f.png"),
              "--gif", str(tmp_path / "f.gif")]
    assert run_cli(evaluate.main, common) == 1
    assert "name its test sequences with --test-set" in said(capsys.readouterr().err)[0]
    np.save(tmp_path / "big.npy", np.concatenate([data, data], axis=-1))  # 32x64 frames
    assert run_cli(evaluate.main, common + ["--test-set", str(tmp_path / "big.npy")]) == 1
    assert "add --any-size" in said(capsys.readouterr().err)[0]
    report = evaluate.main(common + ["--test-set", str(tmp_path / "big.npy"), "--any-size"])
    assert report["sequences"] == 10 and np.isfinite(report["model"]["mse"])


def test_thresholds_outside_the_runs_range_are_refused(dbz_run, capsys):
    root, _ = dbz_run
    argv = ["--checkpoint", str(root / "run" / "checkpoints" / "best.pt"), "--test-set",
            str(root / "dbz.npy"), "--thresholds", "75"]
    assert run_cli(evaluate.main, argv) == 1
    assert said(capsys.readouterr().err)[0].startswith(
        "error: --thresholds 75 lies outside the run's value range [0, 70]")


def test_balanced_loss_trains_on_the_unit_scale(tmp_path):
    """b-mse's bins, given in the data's units, weigh the same pixels as B-MSE in dBZ."""
    data = blobs(6, 6, seed=5)
    np.save(tmp_path / "d.npy", data)
    common = ["--train-data", str(tmp_path / "d.npy"), "--layout", "NTCHW", "--value-range", "0", "70"]
    main.main(tiny(tmp_path / "mse", *common))
    main.main(tiny(tmp_path / "bmse", *common, "--loss", "b-mse", "--balance-thresholds", "10", "30",
                   "--balance-weights", "1", "5", "20"))
    plain, balanced = lines(tmp_path / "mse")[0], lines(tmp_path / "bmse")[0]
    assert balanced["train_loss"] > 2 * plain["train_loss"]  # the echoes weigh 5 and 20 times


# ----------------------------------------------------------------------------------------
# Any channel count and frame size, through the commands a user types

def run(*args, cwd):
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.parametrize("channels", [2, 4])
def test_multichannel_non_square_data_trains_resumes_and_evaluates(tmp_path, channels):
    data = np.random.default_rng(channels).random((8, 20, channels, 48, 64), dtype=np.float32)
    data[..., 16:32, :] *= np.linspace(0, 1, channels, dtype=np.float32)[:, None, None]
    np.save(tmp_path / "seqs.npy", data)
    command = [str(REPO / "main.py"), "--arch", "tiny", "--train-data", "seqs.npy", "--layout", "NTCHW",
               "--device", "cpu", "--workers", "0", "--batch-size", "2", "--out-dir", "run",
               "--thresholds", "0.5"]
    run(*command, "--epochs", "1", cwd=tmp_path)
    run(*command, "--epochs", "2", "--resume", cwd=tmp_path)
    assert [r["epoch"] for r in lines(tmp_path / "run")] == [1, 2]
    model = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["config"]["model"]
    assert model["frame_channels"] == channels and model["image_size"] == [48, 64]
    assert model["stages"][0]["down"]["in_channels"] == channels == model["head"][-1]["out_channels"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images("val/input_truth_prediction")) == 2
    run(str(REPO / "evaluate.py"), "--checkpoint", "run/checkpoints/best.pt", "--test-set", "seqs.npy",
        "--device", "cpu", "--thresholds", "0.5", "--json", "out/scores.json", cwd=tmp_path)
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["sequences"] == 8 and "0.5" in scores["model"]["thresholds"]
    from PIL import Image
    with Image.open(tmp_path / "out" / "predictions.png") as img:  # 3 rows per channel, 4 sequences
        assert img.size[1] >= 2 * 4 * 3 * channels * 48
    with Image.open(tmp_path / "out" / "predictions.gif") as img:
        assert img.n_frames == 20
    with torch.no_grad():
        pred = load_model(tmp_path / "run" / "checkpoints" / "best.pt")(torch.from_numpy(data[:2, :10]), 10)
    assert pred.shape == (2, 10, channels, 48, 64)
