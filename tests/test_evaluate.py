"""evaluate.py on checkpoints of short tiny runs: scores, both SSIM conventions, pictures,
the digit counts it was trained on, and checkpoints of other versions."""

import json

import numpy as np
import pytest
from skimage.metrics import structural_similarity

import evaluate
import main
from checkpoints import atomic_save, load_checkpoint
from data import mm
from utils import UsageError


@pytest.fixture(scope="module")
def run(mnist_root, tmp_path_factory):
    """A tiny run of one short epoch, trained on 1 and 3 digits."""
    run = tmp_path_factory.mktemp("eval") / "run"
    main.main(["--arch", "tiny", "--device", "cpu", "--data-root", str(mnist_root),
               "--no-download", "--out-dir", str(run), "--workers", "0", "--batch-size", "2",
               "--epoch-size", "4", "--val-size", "2", "--epochs", "1", "--num-digits", "1", "3"])
    return run


def score(run, *extra):
    return evaluate.main(["--checkpoint", str(run / "checkpoints" / "best.pt"), "--device", "cpu",
                          "--num", "12", "--batch-size", "5", *extra])


def test_scores_pictures_and_json(run, tmp_path):
    report = score(run, "--json", str(tmp_path / "out" / "scores.json"))
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert saved["sequences"] == 12 and saved["seq_per_s"] > 0 and saved["amp"] == "none"
    for key in ("model", "copy_last_baseline"):
        assert {"mse", "mae", "ssim", "psnr", "ssim_openstl", "per_frame_mse"} <= set(saved[key])
        assert len(saved[key]["per_frame_mse"]) == 10
    assert saved["model"]["mse"] == pytest.approx(report["model"]["mse"])
    from PIL import Image  # beside the JSON by default
    assert Image.open(tmp_path / "out" / "predictions.png").size[0] > 200
    assert Image.open(tmp_path / "out" / "predictions.gif").n_frames == 20
    assert not (run / "predictions.png").exists()


def test_pictures_go_to_the_current_folder_without_json(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    score(run)
    assert (tmp_path / "predictions.png").is_file() and (tmp_path / "predictions.gif").is_file()


def test_the_made_test_set_has_the_trained_digit_counts(run, tmp_path, monkeypatch):
    made = []
    real = evaluate.make_test_set

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(evaluate, "make_test_set", spy)
    report = score(run, "--figure", str(tmp_path / "f.png"), "--gif", str(tmp_path / "f.gif"))
    assert report["num_digits"] == [1, 3]
    config = load_checkpoint(run / "checkpoints" / "best.pt")["config"]
    np.testing.assert_array_equal(made[0], mm.make_test_set(
        config["data_root"], 12, num_digits=[1, 3], download=False))
    override = score(run, "--num-digits", "2", "--figure", str(tmp_path / "f.png"),
                     "--gif", str(tmp_path / "f.gif"))
    assert override["num_digits"] == [2]
    assert override["copy_last_baseline"]["mse"] != report["copy_last_baseline"]["mse"]


def test_ssim_openstl_is_skimage_with_data_range_2_on_float32(run, tmp_path):
    """For copy-last on a fixed test set, as OpenSTL's table computes SSIM."""
    test = mm.make_test_set(load_checkpoint(run / "checkpoints" / "best.pt")["config"]["data_root"],
                            6, num_digits=2, seed=3, download=False)  # (T, N, H, W)
    np.save(tmp_path / "test.npy", test)
    report = score(run, "--test-set", str(tmp_path / "test.npy"), "--json", str(tmp_path / "s.json"))
    frames = test.astype(np.float32) / 255
    last, truth = frames[9], frames[10:]  # copy the last input frame
    expected = np.mean([structural_similarity(last[i], truth[t, i], data_range=2.0)
                        for t in range(10) for i in range(6)])
    assert report["copy_last_baseline"]["ssim_openstl"] == pytest.approx(expected, abs=1e-4)
    range_one = np.mean([structural_similarity(last[i], truth[t, i], data_range=1.0)
                         for t in range(10) for i in range(6)])
    assert report["copy_last_baseline"]["ssim"] == pytest.approx(range_one, abs=1e-4)
    assert report["num_digits"] is None  # a given test set: its own counts


def test_a_checkpoint_of_the_previous_version_scores_the_same(run, tmp_path):
    """Configs written before head_activation, Preset.epochs, schedules and --conv direct."""
    ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
    old = dict(ckpt)
    old["config"] = {k: v for k, v in ckpt["config"].items()
                     if k not in ("schedule", "optimizer", "weight_decay", "warmup", "loss", "precision")}
    old["config"]["conv"] = "auto"
    old["config"]["model"] = {k: v for k, v in ckpt["config"]["model"].items()
                              if k not in ("head_activation", "epochs")}
    atomic_save(old, tmp_path / "old.pt")
    common = ["--device", "cpu", "--num", "6", "--figure", str(tmp_path / "f.png"),
              "--gif", str(tmp_path / "f.gif")]
    new = evaluate.main(["--checkpoint", str(run / "checkpoints" / "best.pt"), *common])
    before = evaluate.main(["--checkpoint", str(tmp_path / "old.pt"), *common])
    assert before["model"] == new["model"]


def test_weights_that_do_not_fit_their_config_are_one_clear_error(run, tmp_path):
    ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if "head" not in k}
    atomic_save(ckpt, tmp_path / "cut.pt")
    with pytest.raises(UsageError, match=r"cut\.pt: its weights don't fit"):
        evaluate.main(["--checkpoint", str(tmp_path / "cut.pt"), "--device", "cpu"])


def test_winograd_evaluates_like_direct(run, tmp_path):
    common = ["--checkpoint", str(run / "checkpoints" / "best.pt"), "--device", "cpu", "--num", "4",
              "--figure", str(tmp_path / "f.png"), "--gif", str(tmp_path / "f.gif")]
    direct = evaluate.main(common)
    winograd = evaluate.main(common + ["--conv", "winograd"])  # tiny's 3x3 convs stay direct
    assert winograd["conv"] == "winograd"
    assert winograd["model"]["mse"] == pytest.approx(direct["model"]["mse"], rel=1e-6)
