"""main.py and evaluate.py end to end on the tiny preset, CPU, a few steps each."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import main
from utils import load_checkpoint

MNIST_ROOT = Path(os.environ.get(
    "MNIST_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))

pytestmark = pytest.mark.filterwarnings("ignore:train-images-idx3-ubyte.gz is not in")


def train(run_dir, *extra, arch="tiny"):
    """A few steps of `arch`: 2 steps of batch 2 an epoch, 4 validation sequences."""
    return main.main([
        "--arch", arch, "--device", "cpu", "--data-root", str(MNIST_ROOT), "--no-download",
        "--out-dir", str(run_dir), "--workers", "0", "--batch-size", "2", "--epoch-size", "4",
        "--val-size", "4", "--log-every", "1", "--frames-input", "3", "--frames-output", "3",
        *extra])


def metrics_lines(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_run_is_a_folder_with_everything(tmp_path):
    run = tmp_path / "run"
    train(run, "--epochs", "2")
    config = json.loads((run / "config.json").read_text())
    assert config["arch"] == "tiny" and config["model"]["cell"] == "convlstm"
    assert config["lr"] == 1e-3 and config["batch_size"] == 2  # preset default, flag
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(run / "checkpoints" / name)
        assert {"model", "optimizer", "scheduler", "early_stopping", "epoch", "step", "rng",
                "config"} <= set(ckpt)
    lines = metrics_lines(run)
    assert [l["epoch"] for l in lines] == [1, 2]
    assert {"epoch", "train_loss", "val_loss", "mse", "mae", "ssim", "psnr", "lr",
            "seconds"} <= set(lines[0])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/epoch_loss", "val/loss", "val/mse", "val/mae", "val/ssim",
            "val/psnr", "lr"} <= set(tags["scalars"])
    assert len(events.Scalars("train/loss")) == 4  # every step is a logging step here
    assert len(events.Scalars("val/loss")) == 2
    # The epoch loss is the mean over the epoch's steps, not the last batch.
    step_losses = [e.value for e in events.Scalars("train/loss")]
    assert events.Scalars("train/epoch_loss")[0].value == pytest.approx(np.mean(step_losses[:2]), rel=1e-5)
    assert "val/input_truth_prediction" in tags["images"]
    assert any(tag.startswith("config") for tag in tags["tensors"])  # the run's config as text

    with pytest.raises(SystemExit, match="already holds a run"):
        train(run, "--epochs", "1")  # never silently overwrite a run


def test_resume_continues_exactly(tmp_path):
    train(tmp_path / "straight", "--epochs", "2")
    train(tmp_path / "split", "--epochs", "1")
    main.main(["--resume", "--out-dir", str(tmp_path / "split"), "--epochs", "2",
               "--workers", "0"])
    straight, split = metrics_lines(tmp_path / "straight"), metrics_lines(tmp_path / "split")
    assert [l["epoch"] for l in split] == [1, 2]
    for a, b in zip(straight, split):
        for key in ("train_loss", "val_loss", "mse", "ssim", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-6, rel=0), key
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_resume_refuses_to_change_the_run(tmp_path):
    train(tmp_path / "run", "--epochs", "1")
    with pytest.raises(SystemExit, match="--lr can't change on --resume"):
        main.main(["--resume", str(tmp_path / "run"), "--lr", "0.5"])


def test_early_stopping_fires_after_patience(tmp_path):
    # lr 0: the val loss never improves after epoch 1, so patience 2 stops after epoch 3.
    train(tmp_path / "run", "--epochs", "10", "--lr", "0", "--patience", "2")
    assert [l["epoch"] for l in metrics_lines(tmp_path / "run")] == [1, 2, 3]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_step, calls = main.train_step, []

    def step_then_nan(*args, **kwargs):
        calls.append(1)
        loss = real_step(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss  # first step of epoch 2

    monkeypatch.setattr(main, "train_step", step_then_nan)
    with pytest.raises(SystemExit, match=r"training loss is nan at step 3.*last\.pt"):
        train(tmp_path / "run", "--epochs", "3")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [l["epoch"] for l in metrics_lines(tmp_path / "run")] == [1]


def test_time_budget_stops_cleanly(tmp_path):
    result = train(tmp_path / "run", "--epochs", "50", "--time-budget", "0.0001")
    assert result["epoch"] == 1 and result["step"] == 1  # one step, validated, saved
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 1


def test_train_on_custom_array(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "seqs.npy", rng.integers(0, 255, (12, 8, 32, 32), dtype=np.uint8))
    result = main.main(["--arch", "tiny", "--device", "cpu", "--train-data",
                        str(tmp_path / "seqs.npy"), "--out-dir", str(tmp_path / "run"),
                        "--workers", "0", "--batch-size", "2", "--epochs", "1",
                        "--frames-input", "4", "--frames-output", "4"])
    assert math.isfinite(result["val_loss"])
    assert result["step"] == 5  # 10 training sequences (the tail 2 are held out), batch 2


@pytest.mark.parametrize("arch", ["convgru", "trajgru"])
def test_other_cells_train_through_main(tmp_path, arch, monkeypatch):
    # The full architectures at 64x64 are slow on a CPU; a 2-sequence epoch shows they train.
    result = main.main(["--arch", arch, "--device", "cpu", "--data-root", str(MNIST_ROOT),
                        "--no-download", "--out-dir", str(tmp_path / arch), "--workers", "0",
                        "--dry-run", "--batch-size", "1", "--frames-input", "2",
                        "--frames-output", "2"])
    assert math.isfinite(result["train_loss"]) and result["epoch"] == 1
    checkpoint = tmp_path / arch / "checkpoints" / "last.pt"
    assert load_checkpoint(checkpoint)["config"]["model"]["cell"] == arch
    report = evaluate.main(["--checkpoint", str(checkpoint), "--data-root", str(MNIST_ROOT),
                            "--num", "2", "--device", "cpu", "--json", str(tmp_path / "s.json")])
    assert report["sequences"] == 2 and math.isfinite(report["model"]["mse"])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    main.main(["--arch", "tiny", "--device", "cpu", "--data-root", str(MNIST_ROOT),
               "--no-download", "--out-dir", str(run), "--workers", "0", "--batch-size", "2",
               "--epoch-size", "4", "--val-size", "2", "--epochs", "1"])
    return run


def test_evaluate_writes_scores_and_pictures(trained_run, tmp_path):
    report = evaluate.main(["--checkpoint", str(trained_run / "checkpoints" / "best.pt"),
                            "--data-root", str(MNIST_ROOT), "--num", "48", "--batch-size", "16",
                            "--json", str(tmp_path / "scores.json"), "--device", "cpu",
                            "--figure", str(tmp_path / "fig.png"), "--gif", str(tmp_path / "p.gif")])
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["sequences"] == 48 and saved["seq_per_s"] > 0
    for key in ("model", "copy_last_baseline"):
        assert {"mse", "mae", "ssim", "psnr", "per_frame_mse"} <= set(saved[key])
        assert len(saved[key]["per_frame_mse"]) == 10
    # Sanity check of the per-frame-sum definition (REFERENCES.md: about 307).
    assert 250 < saved["copy_last_baseline"]["mse"] < 350
    assert saved["model"]["mse"] == pytest.approx(report["model"]["mse"])
    from PIL import Image
    assert Image.open(tmp_path / "fig.png").size[0] > 200
    assert Image.open(tmp_path / "p.gif").n_frames == 20


def test_evaluate_on_a_standard_layout_file(trained_run, tmp_path):
    from data.mm import make_test_set
    np.save(tmp_path / "test.npy", make_test_set(MNIST_ROOT, 6, download=False))
    report = evaluate.main(["--checkpoint", str(trained_run / "checkpoints" / "last.pt"),
                            "--test-set", str(tmp_path / "test.npy"), "--device", "cpu",
                            "--figure", str(tmp_path / "f.png"), "--gif", str(tmp_path / "f.gif")])
    assert report["sequences"] == 6


def test_evaluate_rejects_bad_inputs_clearly(trained_run, tmp_path):
    np.save(tmp_path / "wrong.npy", np.zeros((5, 64, 64), np.uint8))
    with pytest.raises(ValueError, match=r"wrong\.npy.*\(T, N, H, W\)"):
        evaluate.main(["--checkpoint", str(trained_run / "checkpoints" / "last.pt"),
                       "--test-set", str(tmp_path / "wrong.npy"), "--device", "cpu"])
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pt is not a checkpoint"):
        evaluate.main(["--checkpoint", str(tmp_path / "notes.pt"), "--device", "cpu"])


def test_a_failed_start_leaves_no_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MNIST digits"):
        main.main(["--arch", "tiny", "--device", "cpu", "--data-root", str(tmp_path / "empty"),
                   "--no-download", "--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_conv_algorithm_flag(tmp_path, capsys):
    """auto picks Winograd for fp32 on the CPU; it may change on --resume; a Winograd run
    under autocast is refused before any folder is made."""
    train(tmp_path / "run", "--epochs", "1")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["conv"] == "auto"
    assert "cell convolutions: winograd" in capsys.readouterr().out
    main.main(["--resume", "--out-dir", str(tmp_path / "run"), "--epochs", "2",
               "--workers", "0", "--conv", "direct"])
    assert "cell convolutions: direct" in capsys.readouterr().out
    assert [l["epoch"] for l in metrics_lines(tmp_path / "run")] == [1, 2]
    with pytest.raises(ValueError, match="Winograd convolution runs in fp32/fp64 only"):
        train(tmp_path / "bf16", "--amp", "bf16", "--conv", "winograd")
    assert not (tmp_path / "bf16").exists()
