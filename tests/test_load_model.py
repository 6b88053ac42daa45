"""model.load_model: the forecaster of any checkpoint main.py writes or
tools/convert_original.py makes; and checkpoints of the version before it (the --amp flag
stored beside its precision) load, score and resume as checkpoints of this one."""

import json
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

import evaluate
import main
from checkpoints import atomic_save, load_checkpoint
from data import mm
from data.arrays import SequenceArrayDataset, load_sequences
from helpers import randomize
from metrics import METRIC_NAMES, MetricAccumulator
from model import load_model
from original_model import ED
from tools import convert_original
from utils import UsageError

# What Trainer.state_dict() wrote before this version; TrainState writes the same keys.
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "early_stopping", "scaler", "epoch",
                   "position", "step", "epoch_losses", "history", "rng", "config"}


@pytest.fixture(scope="module")
def run(mnist_root, tmp_path_factory):
    """A tiny run of one short epoch on the synthetic digits."""
    run = tmp_path_factory.mktemp("load") / "run"
    main.main(["--arch", "tiny", "--device", "cpu", "--data-root", str(mnist_root),
               "--no-download", "--out-dir", str(run), "--workers", "0", "--batch-size", "2",
               "--epoch-size", "4", "--val-size", "2", "--epochs", "1", "--seed", "3"])
    return run


def old_config(config: dict, amp: str = "auto") -> dict:
    """A config as main.py wrote it before this version: the --amp flag as given under
    "amp", and what it resolved to under "precision", set after the rest."""
    old = {("amp" if key == "precision" else key): (amp if key == "precision" else value)
           for key, value in config.items()}
    old["precision"] = config["precision"]
    return old


def old_checkpoint(path, out):
    ckpt = load_checkpoint(path)
    atomic_save({**ckpt, "config": old_config(ckpt["config"])}, out)
    return out


def evaluate_args(checkpoint, tmp_path, *extra):
    return ["--checkpoint", str(checkpoint), "--device", "cpu", "--num", "6", "--batch-size", "4",
            "--figure", str(tmp_path / "f.png"), "--gif", str(tmp_path / "f.gif"), *extra]


def test_load_model_reproduces_evaluate(run, tmp_path, monkeypatch):
    best = run / "checkpoints" / "best.pt"
    drawn = []
    monkeypatch.setattr(evaluate, "save_prediction_figure", lambda path, *batch: drawn.append(batch))
    report = evaluate.main(evaluate_args(best, tmp_path))
    model = load_model(best)
    assert not model.training and next(model.parameters()).device.type == "cpu"

    inputs, targets, preds = drawn[0]  # evaluate.py's first batch, as it drew it
    with torch.no_grad():
        torch.testing.assert_close(model(inputs, frames_output=10), preds, rtol=1e-4, atol=1e-5)

    # The whole made test set, scored here from load_model's predictions.
    config = load_checkpoint(best)["config"]
    made = mm.make_test_set(config["data_root"], 6, num_digits=config["num_digits"], seed=0,
                            download=False)
    loader = DataLoader(SequenceArrayDataset(load_sequences(made, layout="TNHW"), 10, 10),
                        batch_size=4)
    scores = MetricAccumulator(10)
    with torch.no_grad():
        for x, y in loader:
            scores.update(model(x, frames_output=10), y)
    mine = scores.compute()
    for key in METRIC_NAMES:
        assert mine[key] == pytest.approx(report["model"][key], rel=1e-5), key


def test_a_checkpoint_from_before_this_version_loads_and_scores_identically(run, tmp_path):
    best = run / "checkpoints" / "best.pt"
    assert set(load_checkpoint(best)) == CHECKPOINT_KEYS
    old = old_checkpoint(best, tmp_path / "old.pt")
    assert load_checkpoint(old)["config"]["amp"] == "auto"  # the old layout, as written
    x = torch.rand(2, 10, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_model(old)(x, frames_output=4), load_model(best)(x, frames_output=4))
    before = evaluate.main(evaluate_args(old, tmp_path))
    now = evaluate.main(evaluate_args(best, tmp_path))
    assert before["model"] == now["model"]


def test_a_run_from_before_this_version_resumes_like_one_of_this_version(run, tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    shutil.copytree(run, new)
    shutil.copytree(run, old)
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps(old_config(config), indent=2) + "\n")
    for name in ("last.pt", "best.pt"):
        old_checkpoint(old / "checkpoints" / name, old / "checkpoints" / name)
    for folder in (new, old):
        main.main(["--resume", str(folder), "--epochs", "2", "--workers", "0"])
    lines = {f: [json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()]
             for f in (new, old)}
    assert [r["epoch"] for r in lines[old]] == [1, 2]
    for a, b in zip(lines[new], lines[old]):
        assert {k: v for k, v in a.items() if k != "seconds"} == \
            {k: v for k, v in b.items() if k != "seconds"}
    resumed = json.loads((old / "config.json").read_text())
    assert resumed["precision"] == "none" and "amp" not in resumed  # one key now


def test_a_converted_original_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    original = randomize(ED("convgru"), std=0.2)
    source = tmp_path / "checkpoint_7_0.001.pth.tar"
    torch.save({"epoch": 7, "state_dict": original.state_dict(), "optimizer": {}}, source)
    convert_original.main([str(source), "--arch", "convgru", "--out", str(tmp_path / "c.pt")])
    model = load_model(tmp_path / "c.pt")
    assert not model.training
    x = torch.rand(2, 3, 1, 16, 16)  # fully convolutional: small frames suffice
    with torch.no_grad():
        torch.testing.assert_close(model(x, frames_output=2), original(x, 2), rtol=1e-4, atol=1e-5)


def test_load_model_errors_are_one_line_naming_the_file(run, tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
    atomic_save({**ckpt, "model": {k: v for k, v in ckpt["model"].items() if "head" not in k}},
                tmp_path / "cut.pt")
    config = {**ckpt["config"], "model": {**ckpt["config"]["model"], "cell": "lstm"}}
    atomic_save({**ckpt, "config": config}, tmp_path / "other.pt")
    for name, words in (("missing.pt", "no such file"), ("notes.pt", "is not a checkpoint"),
                        ("cut.pt", "its weights don't fit"),
                        ("other.pt", "its config describes no model")):
        with pytest.raises(UsageError) as err:
            load_model(tmp_path / name)
        message = str(err.value)
        assert str(tmp_path / name) in message and words in message and "\n" not in message, message

