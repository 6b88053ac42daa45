"""main.py end to end on small settings, CPU: the run folder, exact resume, budgets and
signals, the resume rules, crash repair, and the recipe flags."""

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import main
import net_params
from net_params import Conv, Preset, Stage
from checkpoints import load_checkpoint
from utils import run_cli

# Every setting that decides the numbers, so that later default changes can't move them.
RECIPE = ["--schedule", "plateau", "--optimizer", "adam", "--loss", "mse", "--clip", "10",
          "--amp", "none", "--conv", "direct", "--seed", "0"]


def small(mnist_root, run_dir, *extra, arch="tiny"):
    """The flags of a few-second run: 4 steps of batch 2 an epoch, 4 validation sequences."""
    return ["--arch", arch, "--device", "cpu", "--data-root", str(mnist_root), "--no-download",
            "--out-dir", str(run_dir), "--workers", "0", "--batch-size", "2", "--epoch-size", "8",
            "--val-size", "4", "--log-every", "1", "--frames-input", "3", "--frames-output", "3",
            *extra]


def lines(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def same_numbers(a, b, keys=("train_loss", "val_loss", "mse", "mae", "ssim", "psnr",
                             "ssim_openstl", "lr", "step", "epoch")):
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for x, y in zip(a, b):
        for key in keys:
            assert x[key] == y[key], (key, x[key], y[key])


def same_weights(run_a, run_b, name="last.pt"):
    a = load_checkpoint(Path(run_a) / "checkpoints" / name)["model"]
    b = load_checkpoint(Path(run_b) / "checkpoints" / name)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def straight(mnist_root, tmp_path_factory):
    """An uninterrupted 2-epoch run that the stopped-and-resumed runs must equal."""
    run = tmp_path_factory.mktemp("straight") / "run"
    main.main(small(mnist_root, run, "--epochs", "2", *RECIPE))
    return run


# ----------------------------------------------------------------------------------------
# The run folder

def test_a_run_is_a_folder_with_everything(straight):
    config = json.loads((straight / "config.json").read_text())
    assert config["arch"] == "tiny" and config["model"]["cell"] == "convlstm"
    assert config["lr"] == net_params.PRESETS["tiny"].lr and config["batch_size"] == 2  # preset, flag
    assert os.path.isabs(config["data_root"])  # a resume from another folder still finds it
    assert config["precision"] == "none"
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(straight / "checkpoints" / name)
        assert {"model", "optimizer", "scheduler", "early_stopping", "epoch", "position", "step",
                "rng", "history", "config"} <= set(ckpt)
    records = lines(straight)
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"epoch", "step", "train_loss", "val_loss", "mse", "mae", "ssim", "psnr",
            "ssim_openstl", "lr", "seconds"} <= set(records[0])
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["best.pt", "last.pt"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(straight), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/epoch_loss", "val/loss", "val/mse", "val/mae",
            "val/ssim", "val/psnr", "val/ssim_openstl", "lr"} <= set(tags["scalars"])
    assert len(events.Scalars("train/loss")) == 8  # every step is a logging step here
    step_losses = [e.value for e in events.Scalars("train/loss")]
    # The epoch loss is the mean over the epoch's steps, not the last batch.
    assert records[0]["train_loss"] == pytest.approx(np.mean(step_losses[:4]), rel=1e-5)
    assert "val/input_truth_prediction" in tags["images"]
    assert any(tag.startswith("config") for tag in tags["tensors"])
    # The HParams dashboard: the run's settings, with the val/* scalars as its metrics.
    plugins = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(plugins)
    assert b"schedule" in plugins["_hparams_/session_start_info"]
    assert b"val/ssim_openstl" in plugins["_hparams_/experiment"]


def test_metrics_equal_those_before_the_reorganisation(mnist_root, tmp_path, monkeypatch):
    """`tiny` as it was, 2 epochs on the direct path, with the fake digits of conftest: the
    figures that the code before the reorganisation wrote, bit for bit on the machine that
    recorded them (the tolerance allows for other CPUs' convolution kernels)."""
    tiny = Preset(cell="convlstm", cell_kernel=3, norm="group", batch_size=8, lr=1e-3,
                  epoch_size=2_000,
                  stages=[Stage(down=Conv(1, 16, 3, stride=2), hidden=32,
                                up=Conv(32, 16, 4, stride=2, transposed=True)),
                          Stage(down=Conv(32, 32, 3, stride=2), hidden=32,
                                up=Conv(32, 32, 4, stride=2, transposed=True))],
                  head=[Conv(16, 16, 3), Conv(16, 1, 1)])
    monkeypatch.setitem(net_params.PRESETS, "tiny_before", tiny)
    main.main(small(mnist_root, tmp_path / "run", "--epochs", "2", "--lr", "1e-3", *RECIPE,
                    arch="tiny_before"))
    before = [
        {"epoch": 1, "step": 4, "train_loss": 0.04334063082933426, "val_loss": 0.031174297134081524,
         "mse": 127.68992082290326, "mae": 310.824415330387, "ssim": 0.03603863483690191,
         "psnr": 15.197386151462636, "lr": 0.001},
        {"epoch": 2, "step": 8, "train_loss": 0.03547292575240135, "val_loss": 0.03126558164755503,
         "mse": 128.06382688121968, "mae": 395.52145919413306, "ssim": 0.018309708969159694,
         "psnr": 15.151570855768716, "lr": 0.001},
    ]
    for old, new in zip(before, lines(tmp_path / "run"), strict=True):
        for key, value in old.items():
            assert new[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_taken_folder_is_refused_and_a_failed_one_reused(mnist_root, straight, tmp_path,
                                                           monkeypatch):
    assert run_cli(main.main, small(mnist_root, straight, "--epochs", "1")) == 1
    # A start that failed before its first checkpoint left only its config: reuse it.
    failed = tmp_path / "failed"
    real_step = main.train_step
    monkeypatch.setattr(main, "train_step", lambda *a, **k: real_step(*a, **k) * float("nan"))
    assert run_cli(main.main, small(mnist_root, failed, "--epochs", "1")) == 1  # nothing saved
    monkeypatch.setattr(main, "train_step", real_step)
    main.main(small(mnist_root, failed, "--epochs", "1"))
    assert [r["epoch"] for r in lines(failed)] == [1]


# ----------------------------------------------------------------------------------------
# Resume: exactly, from the same command

def test_resume_with_the_same_command_continues_exactly(mnist_root, straight, tmp_path):
    first = small(mnist_root, tmp_path / "split", *RECIPE)
    main.main(first + ["--epochs", "1"])
    main.main(first + ["--epochs", "2", "--resume"])  # the command again, with --resume
    same_numbers(lines(straight), lines(tmp_path / "split"))
    same_weights(straight, tmp_path / "split")


def test_a_time_budget_stop_saves_mid_epoch_and_resume_equals_no_stop(mnist_root, straight, tmp_path):
    command = small(mnist_root, tmp_path / "run", "--epochs", "2", *RECIPE)
    result = main.main(command + ["--time-budget", "1e-6"])  # out of time at the first sync
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["position"], state["step"]) == (0, 2, 1)
    assert result == {} and lines(tmp_path / "run") == []  # no epoch finished
    main.main(command + ["--resume"])
    same_numbers(lines(straight), lines(tmp_path / "run"))
    same_weights(straight, tmp_path / "run")


def test_ctrl_c_saves_says_how_to_resume_and_resume_equals_no_stop(mnist_root, straight, tmp_path,
                                                                   monkeypatch, capsys):
    real_step, calls = main.train_step, []

    def step_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # the second step of epoch 2
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    command = small(mnist_root, tmp_path / "run", "--epochs", "2", *RECIPE)
    monkeypatch.setattr(main, "train_step", step_then_ctrl_c)
    assert run_cli(main.main, command) == 130
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith(("interrupted", "error"))]
    assert len(said) == 1 and said[0].startswith("interrupted: stopped by SIGINT")
    assert "--resume" in said[0] and "Traceback" not in err
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["position"], state["step"]) == (1, 4, 6)
    monkeypatch.setattr(main, "train_step", real_step)
    main.main(command + ["--resume"])
    same_numbers(lines(straight), lines(tmp_path / "run"))
    same_weights(straight, tmp_path / "run")


def test_resume_rules_for_flags(mnist_root, straight, tmp_path, capsys):
    run = tmp_path / "run"
    main.main(small(mnist_root, run, "--epochs", "1", *RECIPE))
    # An experiment flag must keep its value: one line naming the old and the new value.
    assert run_cli(main.main, small(mnist_root, run, "--epochs", "2", "--batch-size", "4",
                                    "--resume")) == 1
    err = capsys.readouterr().err
    assert "--batch-size was 2" in err and "you gave 4" in err
    # Machine flags may change: a moved data folder, and --lr (recorded in the run).
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in Path(mnist_root).iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    main.main(small(moved, run, "--epochs", "2", "--lr", "5e-4", "--resume"))
    config = json.loads((run / "config.json").read_text())
    assert config["lr"] == 5e-4 and config["data_root"] == str(moved)
    preset_lr = net_params.PRESETS["tiny"].lr
    assert config["resumes"][-1]["changed"]["lr"] == [preset_lr, 5e-4]
    assert lines(run)[1]["lr"] == 5e-4 and lines(run)[0]["lr"] == preset_lr


def test_resume_targets(mnist_root, straight, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    for name in ("a", "b"):
        main.main(small(mnist_root, runs / name, "--epochs", "1"))
    # --resume alone takes the newest run that is not training: b is locked, so a.
    lock = main.RunFolder._try_lock(runs / "b" / main.RunFolder.LOCK)
    assert lock not in (None, False)
    main.main(["--resume", "--epochs", "2", "--workers", "0"])
    lock.close()
    assert [r["epoch"] for r in lines(runs / "a")] == [1, 2]
    assert [r["epoch"] for r in lines(runs / "b")] == [1]

    # A fork leaves its source untouched.
    before = {p: p.read_bytes() for p in (runs / "a").rglob("*") if p.is_file() and p.name != ".lock"}
    main.main(["--resume", str(runs / "a" / "checkpoints" / "best.pt"), "--out-dir",
               str(tmp_path / "fork"), "--epochs", "3", "--workers", "0"])
    assert all(p.read_bytes() == content for p, content in before.items())
    fork = lines(tmp_path / "fork")
    assert [r["epoch"] for r in fork] == [1, 2, 3]
    same_numbers(fork[:2], lines(runs / "a"))  # epoch 1 copied, epoch 2 redone alike
    assert json.loads((tmp_path / "fork" / "config.json").read_text())["forked_from"].endswith("best.pt")

    def refused(argv, words):
        assert run_cli(main.main, argv) == 1
        said = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(said) == 1 and said[0].startswith("error:") and words in said[0], said

    (tmp_path / "loose").mkdir()
    loose = tmp_path / "loose" / "model.pt"
    loose.write_bytes((runs / "a" / "checkpoints" / "last.pt").read_bytes())
    refused(["--resume", str(loose)], "add --out-dir")
    refused(["--resume", str(runs / "a" / "checkpoints" / "best.pt")], "fork it instead with --out-dir")
    refused(["--resume", ""], "--resume '' names no run")
    refused(["--resume", str(runs / "b"), "--out-dir", str(runs / "a")], "already holds a run")
    assert not (tmp_path / "runs" / "c").exists()


def test_a_folder_that_is_training_is_refused(mnist_root, straight, tmp_path, capsys):
    run = tmp_path / "run"
    main.main(small(mnist_root, run, "--epochs", "1"))
    lock = main.RunFolder._try_lock(run / main.RunFolder.LOCK)
    assert run_cli(main.main, ["--resume", str(run), "--epochs", "2"]) == 1
    assert "being trained by another process" in capsys.readouterr().err
    lock.close()  # the other process is gone: its lock with it
    main.main(["--resume", str(run), "--epochs", "2", "--workers", "0"])
    assert [r["epoch"] for r in lines(run)] == [1, 2]


def test_resume_repairs_what_a_kill_left_half_done(mnist_root, straight, tmp_path):
    """A kill after last.pt and before best.pt and metrics.jsonl were written, mid-write
    temp files, and a stale best.pt: resume puts the folder in line with last.pt."""
    run = tmp_path / "run"
    command = small(mnist_root, run, *RECIPE)
    main.main(command + ["--epochs", "1"])
    ckpts = run / "checkpoints"
    epoch1 = (ckpts / "last.pt").read_bytes()
    main.main(command + ["--epochs", "2", "--resume"])
    best = load_checkpoint(ckpts / "best.pt")["epoch"]
    # Make the folder look as if the process died right after epoch 2's last.pt.
    (ckpts / "best.pt").write_bytes(epoch1)
    (run / "metrics.jsonl").write_text(json.dumps(lines(run)[0]) + "\n" + '{"epoch": 2, "tra')
    (ckpts / ".last.pt.123.abcd.tmp").write_bytes(b"half")
    (run / ".metrics.jsonl.123.abcd.tmp").write_bytes(b"half")
    main.main(command + ["--epochs", "2", "--resume"])
    same_numbers(lines(straight), lines(run))
    assert load_checkpoint(ckpts / "best.pt")["epoch"] == best
    assert not list(run.rglob("*.tmp"))


def test_nan_stops_with_advice_that_works(mnist_root, tmp_path, monkeypatch, capsys):
    real_step, calls = main.train_step, []

    def nan_at(step):
        def fn(*args, **kwargs):
            calls.append(1)
            loss = real_step(*args, **kwargs)
            return loss * float("nan") if len(calls) == step else loss
        return fn

    run = tmp_path / "run"
    command = small(mnist_root, run, "--epochs", "2")
    monkeypatch.setattr(main, "train_step", nan_at(2))  # in epoch 1: nothing saved yet
    assert run_cli(main.main, command) == 1
    err = capsys.readouterr().err
    assert "training loss is nan at step 2" in err and "nothing was saved" in err
    calls.clear()
    monkeypatch.setattr(main, "train_step", nan_at(6))  # in epoch 2: last.pt holds epoch 1
    assert run_cli(main.main, command + ["--lr", "5e-4"]) == 1  # the same command, reused
    err = capsys.readouterr().err
    assert "holds epoch 1" in err and "--lr" in err
    assert [r["epoch"] for r in lines(run)] == [1]
    monkeypatch.setattr(main, "train_step", real_step)
    main.main(["--resume", str(run), "--lr", "2e-4", "--workers", "0"])
    assert [r["epoch"] for r in lines(run)] == [1, 2]


def test_early_stopping_fires_after_patience(mnist_root, tmp_path, monkeypatch):
    real = main.validate

    def flat(*args, **kwargs):  # the val loss never improves after epoch 1
        _, metrics, first = real(*args, **kwargs)
        return 1.0, metrics, first

    monkeypatch.setattr(main, "validate", flat)
    main.main(small(mnist_root, tmp_path / "run", "--epochs", "10", "--patience", "2"))
    assert [r["epoch"] for r in lines(tmp_path / "run")] == [1, 2, 3]


def test_persistent_workers_see_every_epoch(mnist_root, straight, tmp_path):
    """DataLoader workers that live across epochs still draw each epoch's sequences."""
    main.main(small(mnist_root, tmp_path / "run", "--epochs", "2", *RECIPE, "--workers", "2"))
    same_numbers(lines(straight), lines(tmp_path / "run"))


def test_train_on_custom_array(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "seqs.npy", rng.integers(0, 255, (12, 8, 32, 32), dtype=np.uint8))
    result = main.main(["--arch", "tiny", "--device", "cpu", "--train-data",
                        str(tmp_path / "seqs.npy"), "--layout", "NTHW", "--out-dir", str(tmp_path / "run"),
                        "--workers", "0", "--batch-size", "2", "--epochs", "1",
                        "--frames-input", "4", "--frames-output", "4"])
    assert math.isfinite(result["val_loss"])
    assert result["step"] == 5  # 10 training sequences (the tail 2 are held out), batch 2


@pytest.mark.parametrize("arch", [pytest.param(name, marks=[] if name == "tiny" else pytest.mark.slow)
                                  for name in net_params.PRESETS])
def test_every_preset_trains_through_main(mnist_root, tmp_path, arch):
    result = main.main(["--arch", arch, "--device", "cpu", "--data-root", str(mnist_root),
                        "--no-download", "--out-dir", str(tmp_path / arch), "--workers", "0",
                        "--dry-run", "--batch-size", "1", "--frames-input", "2",
                        "--frames-output", "2"])
    assert math.isfinite(result["train_loss"]) and result["epoch"] == 1
    assert load_checkpoint(tmp_path / arch / "checkpoints" / "last.pt")["config"]["arch"] == arch


# ----------------------------------------------------------------------------------------
# Device defaults and the recipe flags

def test_amp_defaults_to_auto_which_is_fp32_on_the_cpu(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--amp {auto,none,bf16,fp16}" in help_text and "(default: auto)" in help_text
    import devices
    from devices import resolve_amp
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)  # a CPU without native bf16
    assert resolve_amp("auto", torch.device("cpu")) == "none"
    assert resolve_amp("bf16", torch.device("cpu")) == "bf16"


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_schedules_change_the_logged_lr(mnist_root, tmp_path, schedule):
    main.main(small(mnist_root, tmp_path / "run", "--epochs", "2", "--schedule", schedule,
                    "--lr", "2e-3"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    events.Reload()
    lrs = [e.value for e in events.Scalars("train/lr")]  # after each of the 8 steps
    expected = [2e-3 * main.lr_factor(schedule, {"cosine": 0.05, "onecycle": 0.3}[schedule], s, 8)
                for s in range(1, 9)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert max(lrs) > 3 * lrs[-1]  # it did decay
    assert lines(tmp_path / "run")[-1]["lr"] == pytest.approx(expected[-1])


def test_lr_factor_shapes():
    cos = [main.lr_factor("cosine", 0.1, s, 100) for s in range(101)]
    assert cos[0] < cos[5] < cos[9] <= 1 and cos[10] == pytest.approx(1) and cos[100] == pytest.approx(0)
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))
    one = [main.lr_factor("onecycle", 0.3, s, 100) for s in range(101)]
    assert one[0] == pytest.approx(1 / 25) and one[30] == pytest.approx(1) and one[100] < 1e-4


def test_loss_l1_term_changes_the_training_loss(mnist_root, tmp_path):
    runs = {}
    for loss in ("mse", "mse+l1"):
        main.main(small(mnist_root, tmp_path / loss, "--epochs", "1", "--loss", loss))
        runs[loss] = lines(tmp_path / loss)[0]
    # The first step's predictions are the same: the L1 term adds the mean absolute error.
    assert runs["mse+l1"]["train_loss"] > runs["mse"]["train_loss"] + 0.01
    assert runs["mse+l1"]["val_loss"] != runs["mse"]["val_loss"]  # the training differed


def test_adamw_weight_decay_shrinks_weights(mnist_root, tmp_path):
    norms = {}
    for name, extra in (("adam", []), ("adamw", ["--optimizer", "adamw", "--weight-decay", "50"])):
        main.main(small(mnist_root, tmp_path / name, "--epochs", "1", *extra))
        model = load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")["model"]
        norms[name] = sum(v.float().norm() ** 2 for k, v in model.items() if k.endswith("weight"))
    assert norms["adamw"] < 0.9 * norms["adam"]


def test_clip_inf_turns_clipping_off(mnist_root, tmp_path):
    results = {}
    for clip in ("1e-6", "inf"):
        results[clip] = main.main(small(mnist_root, tmp_path / clip, "--epochs", "1", "--clip", clip))
    assert results["1e-6"]["val_loss"] != results["inf"]["val_loss"]
