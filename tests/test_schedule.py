"""The schedule fitted to --time-budget (on a fake clock), a new --epochs on resume, and the
precision --amp auto gives on the CPU and on resume."""

import json
import re
import signal
import os
import time

import pytest
import torch

import devices
import main
import model
import net_params
from checkpoints import load_checkpoint
import schedule
from test_main import lines, same_numbers, same_weights
from utils import run_cli

# Every setting that decides the numbers, with a decaying schedule (fitting needs one).
ONECYCLE = ["--schedule", "onecycle", "--optimizer", "adam", "--loss", "mse", "--clip", "10",
            "--amp", "none", "--conv", "direct", "--seed", "0", "--lr", "2e-3"]


def quick(mnist_root, run_dir, *extra):
    """Epochs of 2 steps of batch 2, a validation of 1 batch: tiny, 3 -> 3 frames."""
    return ["--arch", "tiny", "--device", "cpu", "--data-root", str(mnist_root), "--no-download",
            "--out-dir", str(run_dir), "--workers", "0", "--batch-size", "2", "--epoch-size", "4",
            "--val-size", "2", "--log-every", "1", "--frames-input", "3", "--frames-output", "3",
            *extra]


class FakeClock:
    """time.time() of a machine on which a training step takes `step` seconds and a
    validation batch `batch` seconds, whatever this CPU does: the runs' real work is done,
    but only the steps and batches move the clock."""

    def __init__(self, monkeypatch):
        self.now, self.step, self.batch = 1e9, 0.0, 0.0
        real_step, real_validate = main.train_step, main.validate

        def train_step(*args, **kwargs):
            self.now += self.step
            return real_step(*args, **kwargs)

        def validate(model, loader, *args, **kwargs):
            self.now += self.batch * len(loader)
            return real_validate(model, loader, *args, **kwargs)

        monkeypatch.setattr(time, "time", lambda: self.now)
        monkeypatch.setattr(main, "train_step", train_step)
        monkeypatch.setattr(main, "validate", validate)


def ctrl_c_at_training_step(n: int, calibrations: int = 1):
    """(main.train_step as it is, a train_step that sends this process SIGINT at the n-th
    training step after `calibrations` calibrations of one round of steps each)."""
    stepping, calls = main.train_step, []

    def step_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == calibrations * (1 + schedule.CALIBRATION_STEPS) + n:
            os.kill(os.getpid(), signal.SIGINT)
        return stepping(*args, **kwargs)

    return stepping, step_then_ctrl_c


@pytest.fixture
def clock(monkeypatch):
    return FakeClock(monkeypatch)


@pytest.fixture(autouse=True)
def tiny_alone(monkeypatch):
    """tiny without its lighter preset: these tests time and fit one model (a fitted run of a
    few steps would otherwise train tiny_lite); the lighter swap has its own tests."""
    monkeypatch.setattr(net_params.PRESETS["tiny"], "lighter", None)


def config_of(run_dir):
    return json.loads((run_dir / "config.json").read_text())


def logged_lrs(run_dir) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/lr")}


# ----------------------------------------------------------------------------------------
# Fitting the schedule to the budget

def test_the_fitted_length_scales_with_the_measured_speed_and_ends_inside_the_budget(
        mnist_root, tmp_path, clock, capsys):
    budget = 120
    epochs = {}
    for step in (8.0, 4.0):
        clock.step, clock.batch = step, 2.0
        run, start = tmp_path / f"step{step:g}", clock.now
        main.main(quick(mnist_root, run, *ONECYCLE, "--time-budget", str(budget / 60)))
        config, history = config_of(run), lines(run)
        said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fitted")]
        assert len(said) == 1 and f"{config['epochs']} epochs of 2 steps ({step:g} s a step" in said[0]
        assert config["fitted"]["epochs"] == config["epochs"] > 1
        assert config["fitted"]["step_seconds"] == pytest.approx(step)
        # The whole schedule ran, inside the budget, down to the schedule's final LR ...
        assert [r["epoch"] for r in history] == list(range(1, config["epochs"] + 1))
        assert history[-1]["step"] == 2 * config["epochs"]
        assert history[-1]["lr"] == pytest.approx(2e-3 / 25e4)
        assert clock.now <= start + budget
        # ... and one more epoch would not have fit inside the budget less its margin.
        assert clock.now + 2 * step + 2.0 > start + budget * (1 - schedule.SAFETY)
        epochs[step] = config["epochs"]
        recorded = load_config(run)  # the checkpoint records the same fit
        assert (recorded["epochs"], recorded["fitted"]) == (config["epochs"], config["fitted"])
    assert epochs[4.0] >= 2 * epochs[8.0]  # twice the speed: more than twice the epochs (fixed costs)


def load_config(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["config"]


def test_kill_and_resume_of_a_fitted_run_equals_the_run_uninterrupted(mnist_root, tmp_path, clock,
                                                                      monkeypatch):
    clock.step, clock.batch = 5.0, 2.0
    def fitted(run):
        return quick(mnist_root, tmp_path / run, *ONECYCLE, "--time-budget", "1.75")

    main.main(fitted("straight"))
    epochs = config_of(tmp_path / "straight")["epochs"]
    assert epochs >= 3

    # The same command, Ctrl-C in epoch 2 (after the calibration's steps), then --resume.
    stepping, step_then_ctrl_c = ctrl_c_at_training_step(3)
    monkeypatch.setattr(main, "train_step", step_then_ctrl_c)
    assert run_cli(main.main, fitted("killed")) == 130
    assert [r["epoch"] for r in lines(tmp_path / "killed")] == [1]
    monkeypatch.setattr(main, "train_step", stepping)
    main.main(fitted("killed") + ["--resume"])
    assert config_of(tmp_path / "killed")["fitted"] == config_of(tmp_path / "straight")["fitted"]
    same_numbers(lines(tmp_path / "straight"), lines(tmp_path / "killed"))
    same_weights(tmp_path / "straight", tmp_path / "killed")

    # Calibration leaves no trace: the run equals one told the fitted --epochs outright.
    main.main(quick(mnist_root, tmp_path / "told", *ONECYCLE, "--epochs", str(epochs)))
    same_numbers(lines(tmp_path / "straight"), lines(tmp_path / "told"))
    same_weights(tmp_path / "straight", tmp_path / "told")
    rngs = [load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")["rng"]["torch"]
            for name in ("straight", "told")]
    assert torch.equal(*rngs)


def test_calibration_times_steps_for_its_share_of_the_budget(monkeypatch):
    """Rounds of steps until calibration_seconds have passed, a step timed at the median
    round: a machine whose steps slow from 0.5 to 1 s is timed at what it then runs, and one
    round that something else slowed does not stretch the schedule's estimate. Never more
    than CALIBRATION_ROUNDS rounds, even where steps take no time."""
    now, steps, seconds_a_step = [0.0], [], [None]

    def train_steps(n):
        for _ in range(n):
            steps.append(1)
            now[0] += seconds_a_step[0](len(steps))

    monkeypatch.setattr(time, "time", lambda: now[0])
    seconds = schedule.calibration_seconds(15 * 60)
    assert seconds == pytest.approx(18.0)  # 2% of 15 minutes
    seconds_a_step[0] = lambda k: 0.5 if k <= 9 else 1.0  # the warm-up step and round 1 fast
    speed = schedule.calibrate(train_steps, lambda n: None, 1, lambda: None, lambda: None, seconds)
    timed = len(steps) - 1  # after the warm-up step
    assert timed % schedule.CALIBRATION_STEPS == 0 and timed * 1.0 - 4 >= seconds
    assert speed.step == pytest.approx(1.0)  # rounds of 0.5, 1 and 1 s a step

    steps.clear()
    seconds_a_step[0] = lambda k: 1.5 if 10 <= k <= 17 else 0.5  # round 2 disturbed
    speed = schedule.calibrate(train_steps, lambda n: None, 1, lambda: None, lambda: None, seconds)
    assert len(steps) == 1 + 3 * schedule.CALIBRATION_STEPS  # rounds of 4, 12 and 4 s
    assert speed.step == pytest.approx(0.5)  # their mean, 0.83 s, would fit 40% fewer steps

    steps.clear()
    monkeypatch.setattr(time, "time", lambda: 0.0)
    schedule.calibrate(train_steps, lambda n: None, 1, lambda: None, lambda: None, seconds)
    assert len(steps) == 1 + schedule.CALIBRATION_ROUNDS * schedule.CALIBRATION_STEPS
    assert schedule.calibration_seconds(60) == 5.0 and schedule.calibration_seconds(7200) == 60.0


def test_where_few_steps_fit_the_lighter_preset_trains_and_resumes_exactly(
        mnist_root, tmp_path, clock, monkeypatch, capsys):
    """tiny fits 20 steps here; told to train tiny_lite below 21, the fit builds, times and
    trains tiny_lite instead, records it, and a kill + resume, and a run told --arch
    tiny_lite and the fitted --epochs outright, equal it."""
    monkeypatch.setattr(net_params.PRESETS["tiny"], "lighter", "tiny_lite")
    monkeypatch.setattr(net_params.PRESETS["tiny"], "lighter_below", 21)
    clock.step, clock.batch = 5.0, 2.0

    def fitted(run):  # each calibration takes 53 s: 9 steps, 4 validation batches
        return quick(mnist_root, tmp_path / run, *ONECYCLE, "--time-budget", "3")

    main.main(fitted("straight"))
    config = config_of(tmp_path / "straight")
    said = capsys.readouterr().out
    assert "tiny fits 20 steps in the budget here (5 s a step), fewer than 21: training the lighter " \
           "tiny_lite instead (648,953 parameters; give --epochs to train tiny as it is)" in said
    assert config["arch"] == "tiny" and config["fitted"]["instead_of"] == {
        "arch": "tiny", "steps": 20, "step_seconds": 5.0}
    lite = model.fit_to_data("tiny_lite", 1, (64, 64))
    lite.frames_input = lite.frames_output = 3
    assert config["model"] == lite.to_dict()
    # The lighter model was timed for its own fit (one calibration after tiny's), and the
    # checkpoints hold it: load_model rebuilds it from the run alone.
    assert (config["epochs"], config["fitted"]["steps_per_epoch"]) == (5, 2)  # 74 s were left
    assert model.count_parameters(model.load_model(tmp_path / "straight" / "checkpoints" / "best.pt")) == 648_953

    stepping, step_then_ctrl_c = ctrl_c_at_training_step(3, calibrations=2)
    monkeypatch.setattr(main, "train_step", step_then_ctrl_c)
    assert run_cli(main.main, fitted("killed")) == 130
    monkeypatch.setattr(main, "train_step", stepping)
    main.main(fitted("killed") + ["--resume"])
    main.main(quick(mnist_root, tmp_path / "told", *ONECYCLE, "--arch", "tiny_lite",
                    "--epochs", str(config["epochs"])))
    assert config_of(tmp_path / "killed")["model"] == config["model"]
    for other in ("killed", "told"):
        same_numbers(lines(tmp_path / "straight"), lines(tmp_path / other))
        same_weights(tmp_path / "straight", tmp_path / other)


def test_where_enough_steps_fit_the_preset_trains_as_it_is(mnist_root, tmp_path, clock, monkeypatch, capsys):
    """The same machine, told to go lighter only below 20 steps: tiny fits 20, and trains."""
    monkeypatch.setattr(net_params.PRESETS["tiny"], "lighter", "tiny_lite")
    monkeypatch.setattr(net_params.PRESETS["tiny"], "lighter_below", 20)
    clock.step, clock.batch = 5.0, 2.0
    main.main(quick(mnist_root, tmp_path / "run", *ONECYCLE, "--time-budget", "3"))
    config = config_of(tmp_path / "run")
    assert "lighter" not in capsys.readouterr().out and "instead_of" not in config["fitted"]
    assert model.count_parameters(model.build_model(config["model"])) == 1_132_785
    assert (config["epochs"], config["fitted"]["steps_per_epoch"]) == (10, 2)


def slowing_after(clock, monkeypatch, calls: int, seconds: float):
    """Training steps take `seconds` on the fake clock after the first `calls` (the
    calibration's 9 included): a machine that slows down once the length is fixed."""
    made, inner = [0], main.train_step

    def step(*args, **kwargs):
        made[0] += 1
        if made[0] > calls:
            clock.step = seconds
        return inner(*args, **kwargs)

    monkeypatch.setattr(main, "train_step", step)


@pytest.mark.parametrize("slow_from_epoch, epochs, steps, warming_up", [(1, 8, 15, True), (4, 8, 16, False)])
def test_a_machine_that_slows_down_ends_its_schedule_inside_the_budget(
        mnist_root, tmp_path, clock, monkeypatch, capsys, slow_from_epoch, epochs, steps, warming_up):
    """Calibrated at 5 s a step, 10 epochs of 2 steps (12 s with validation) fit the 127 s
    left of 3 minutes; then steps take 7 s (16 s an epoch). After the first slow epoch the
    run sees that the rest won't end inside the budget and ends its schedule at the last
    step that does, inside an epoch where need be (epoch 8's first step when the slowing
    comes at epoch 1): in the warm-up by a shorter shape, later by a half cosine from its
    LR down to the final value, which it still reaches in time."""
    clock.step, clock.batch = 5.0, 2.0
    slowing_after(clock, monkeypatch, 9 + 2 * (slow_from_epoch - 1), 7.0)
    run, start = tmp_path / "run", clock.now
    main.main(quick(mnist_root, run, *ONECYCLE, "--time-budget", "3"))
    config, history, said = config_of(run), lines(run), capsys.readouterr().out
    assert config["fitted"]["epochs"] == 10 and (config["epochs"], config["total_steps"]) == (epochs, steps)
    assert config["fitted"]["shortened"] == {"after_epoch": slow_from_epoch, "total_steps_before": 20,
                                             "epoch_seconds": 16.0}
    assert load_config(run)["total_steps"] == steps  # the checkpoint and config.json agree
    assert f"so the schedule now ends at step {steps}, in epoch {epochs}" in said
    assert ("still warming up" if warming_up else "the LR goes from") in said
    assert ("anneal" in config) is not warming_up
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1)) and clock.now <= start + 180
    assert history[-1]["step"] == steps and history[-1]["lr"] == pytest.approx(2e-3 / 25e4)
    lrs = logged_lrs(run)
    if not warming_up:  # continuous where the half cosine takes over, then down only
        after = [lrs[s] for s in sorted(lrs) if s >= 2 * slow_from_epoch]
        assert after == sorted(after, reverse=True) and after[0] == pytest.approx(
            lrs[2 * slow_from_epoch - 1], rel=0.2)


def test_a_shortened_schedule_resumes_exactly(mnist_root, tmp_path, clock, monkeypatch):
    """Killed after the schedule was shortened (epoch 4 of the case above), then resumed with
    the same command: the shortened schedule goes on, and the run equals the one not killed."""
    def fitted(run):
        return quick(mnist_root, tmp_path / run, *ONECYCLE, "--time-budget", "3")

    clocked = main.train_step
    for run in ("straight", "killed"):
        monkeypatch.setattr(main, "train_step", clocked)
        clock.step, clock.batch = 5.0, 2.0
        slowing_after(clock, monkeypatch, 9 + 2 * 3, 7.0)
        if run == "straight":
            main.main(fitted(run))
    stepping, step_then_ctrl_c = ctrl_c_at_training_step(11)  # epoch 6
    monkeypatch.setattr(main, "train_step", step_then_ctrl_c)
    assert run_cli(main.main, fitted("killed")) == 130
    assert [r["epoch"] for r in lines(tmp_path / "killed")] == [1, 2, 3, 4, 5]
    monkeypatch.setattr(main, "train_step", stepping)
    main.main(fitted("killed") + ["--resume"])
    assert config_of(tmp_path / "killed")["total_steps"] == 16 == config_of(tmp_path / "straight")["total_steps"]
    same_numbers(lines(tmp_path / "straight"), lines(tmp_path / "killed"))
    same_weights(tmp_path / "straight", tmp_path / "killed")


def test_a_free_epoch_size_is_fitted_to_fill_the_budget(mnist_root, tmp_path, clock, monkeypatch, capsys):
    """Without --epoch-size, a Moving MNIST run sizes its epochs too: here 2.7 epochs of the
    preset's 4 steps fit, and 2 epochs of 5 steps fill what the third would have left."""
    monkeypatch.setattr(net_params.PRESETS["tiny"], "epoch_size", 8)  # 4 steps of batch 2
    clock.step, clock.batch = 5.0, 2.0
    budget = 1 * 5 + schedule.CALIBRATION_STEPS * 5 + (1 + schedule.VAL_BATCHES) * 2 + 62.5

    def fitted(run, *extra):
        args = quick(mnist_root, tmp_path / run, *ONECYCLE, *extra)
        at = args.index("--epoch-size")
        return args[:at] + args[at + 2:]

    start = clock.now
    main.main(fitted("straight", "--time-budget", str(budget / 60)))
    config, history = config_of(tmp_path / "straight"), lines(tmp_path / "straight")
    assert (config["epochs"], config["fitted"]["steps_per_epoch"], config["epoch_size"]) == (2, 5, 10)
    assert "fitted the schedule to the budget: 2 epochs of 5 steps (10 sequences; 5 s a step" in capsys.readouterr().out
    assert [r["step"] for r in history] == [5, 10] and history[-1]["lr"] == pytest.approx(2e-3 / 25e4)
    assert clock.now <= start + budget

    # Killed in epoch 2 and resumed: the same run, which is the run told its length outright.
    stepping, step_then_ctrl_c = ctrl_c_at_training_step(7)
    monkeypatch.setattr(main, "train_step", step_then_ctrl_c)
    assert run_cli(main.main, fitted("killed", "--time-budget", str(budget / 60))) == 130
    monkeypatch.setattr(main, "train_step", stepping)
    main.main(fitted("killed", "--time-budget", str(budget / 60)) + ["--resume"])
    main.main(fitted("told", "--epochs", "2", "--epoch-size", "10"))
    for other in ("killed", "told"):
        same_numbers(history, lines(tmp_path / other))
        same_weights(tmp_path / "straight", tmp_path / other)


def test_a_gpu_users_budget_fits_the_default_convlstm_schedule(mnist_root, tmp_path, clock,
                                                              monkeypatch, capsys):
    """`python main.py --time-budget 120`, the default preset, on a machine whose step takes
    0.25 s: the calibration and the fit run as on a GPU; no step computes anything."""

    def fake_step(model, optimizer, *args, **kwargs):
        clock.now += 0.25
        optimizer.step()  # no gradients: a no-op that keeps the scheduler's order
        return torch.zeros(())

    def fake_validate(model, loader, *args, **kwargs):
        clock.now += 0.1 * len(loader)

    class Fitted(Exception):
        """Raised where training would begin."""

    def begin(*args, **kwargs):
        raise Fitted

    monkeypatch.setattr(main, "train_step", fake_step)
    monkeypatch.setattr(main, "validate", fake_validate)
    monkeypatch.setattr(main, "train_epoch", begin)
    run = tmp_path / "gpu"
    with pytest.raises(Fitted):
        main.main(["--time-budget", "120", "--device", "cpu", "--data-root", str(mnist_root),
                   "--no-download", "--out-dir", str(run), "--workers", "0"])
    config = config_of(run)
    fitted = config["fitted"]
    assert config["arch"] == "convlstm" and config["schedule"] == "onecycle"
    assert fitted["step_seconds"] == pytest.approx(0.25)
    assert fitted["validation_seconds"] == pytest.approx(0.1 * 63)  # 1,000 sequences, batch 16
    # Epochs of the preset's 625 steps, as many as fit, then each stretched to fill the budget.
    epochs, steps, usable = config["epochs"], fitted["steps_per_epoch"], fitted["seconds_left"] * (1 - schedule.SAFETY)
    per_epoch = 0.1 * 63 + schedule.CHECKPOINTS_PER_EPOCH * fitted["checkpoint_seconds"]
    assert epochs == fitted["epochs"] and (epochs + 1) * (625 * 0.25 + per_epoch) > usable
    assert config["epoch_size"] == 16 * steps and 625 <= steps <= 625 * (epochs + 1) / epochs
    assert epochs * (steps * 0.25 + per_epoch) <= usable < epochs * ((steps + 1) * 0.25 + per_epoch)
    assert 120 * 60 - 60 < fitted["seconds_left"] < 120 * 60  # calibration took seconds
    assert f"fitted the schedule to the budget: {epochs} epochs of {steps} steps" in capsys.readouterr().out

    # The LR schedule that training steps through: up to the peak, down to its end at the
    # fitted length's last step.
    state = main.TrainState(config, torch.nn.Linear(1, 1), steps, torch.device("cpu"))
    lrs = []
    for _ in range(epochs * steps):
        state.optimizer.step()
        state.scheduler.step()
        lrs.append(state.lr)
    assert max(lrs) == pytest.approx(config["lr"], rel=1e-4)
    assert lrs[-1] == pytest.approx(config["lr"] / 25e4)
    assert lrs[-2] > lrs[-1]  # still decaying at the last step: the shape spans the fitted length


def test_explicit_epochs_are_kept_and_a_warning_names_what_fits(mnist_root, tmp_path, clock, capsys):
    clock.step, clock.batch = 10.0, 4.0
    main.main(quick(mnist_root, tmp_path / "fits", *ONECYCLE, "--epochs", "2", "--time-budget", "2"))
    assert "warning" not in capsys.readouterr().out

    run = tmp_path / "long"
    main.main(quick(mnist_root, run, *ONECYCLE, "--epochs", "50", "--time-budget", "2"))
    config = config_of(run)
    assert config["epochs"] == 50 and "fitted" not in config
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(said) == 1 and said[0].startswith("warning: --epochs 50 won't end inside --time-budget 2")
    fits = int(re.search(r"(\d+) epochs? would fit", said[0]).group(1))
    done = len(lines(run))  # the budget stopped it: the count the warning named did fit
    assert 1 <= fits <= done <= fits + 1


def test_plateau_with_a_budget_is_not_fitted(mnist_root, tmp_path, clock):
    clock.step, clock.batch = 10.0, 4.0
    run = tmp_path / "run"
    main.main(quick(mnist_root, run, "--schedule", "plateau", "--epochs", "3", "--time-budget", "2"))
    assert "fitted" not in config_of(run) and [r["epoch"] for r in lines(run)] == [1, 2, 3]


# ----------------------------------------------------------------------------------------
# A new --epochs on resume

def test_a_new_epochs_on_resume_anneals_from_the_lr_it_has(mnist_root, tmp_path, monkeypatch, capsys):
    stepping, calls = main.train_step, []

    def ctrl_c_at(n):
        def step(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGINT)
            return stepping(*args, **kwargs)
        return step

    def resume(run, epochs, stop_at=None):
        monkeypatch.setattr(main, "train_step", stepping if stop_at is None else ctrl_c_at(stop_at))
        argv = quick(mnist_root, run, *ONECYCLE, "--epochs", str(epochs), "--resume")
        assert run_cli(main.main, argv) == (0 if stop_at is None else 130)
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("--epochs")]

    runs = {name: tmp_path / name for name in ("once", "twice")}
    for run in runs.values():
        calls.clear()
        monkeypatch.setattr(main, "train_step", ctrl_c_at(3))
        assert run_cli(main.main, quick(mnist_root, run, *ONECYCLE, "--epochs", "3")) == 130
    said = resume(runs["once"], 5)  # after step 3 of 6: 7 steps to go
    assert len(said) == 1 and said[0].startswith("--epochs 5 instead of 3") and "step 3" in said[0]
    assert len(resume(runs["twice"], 5, stop_at=6)) == 1  # stopped again, 3 steps on
    assert resume(runs["twice"], 5) == []  # the length it has: nothing to say

    run = runs["once"]
    lrs = logged_lrs(run)
    assert sorted(lrs) == list(range(1, 11))
    at_stop = 2e-3 * schedule.lr_factor("onecycle", 0.3, 3, 6)  # decaying already
    assert lrs[3] == pytest.approx(at_stop, rel=1e-6) and lrs[3] < max(lrs.values())
    after = [lrs[s] for s in range(4, 11)]
    assert all(a >= b for a, b in zip([lrs[3]] + after, after))  # no jump back up
    assert after[-1] == pytest.approx(2e-3 / 25e4, rel=1e-5)
    assert config_of(run)["anneal"]["step"] == 3 and config_of(run)["epochs"] == 5
    # Deterministic: a run stopped and resumed again along the new length equals it.
    same_numbers(lines(runs["once"]), lines(runs["twice"]))
    same_weights(runs["once"], runs["twice"])


# ----------------------------------------------------------------------------------------
# --amp auto on the CPU, and on resume

@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_on_the_cpu_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert devices.resolve_amp("auto", cpu) == ("bf16" if native else "none")
    assert devices.resolve_amp("none", cpu) == "none" and devices.resolve_amp("bf16", cpu) == "bf16"


@pytest.mark.parametrize("machine, mkldnn, avx512_bf16, amx, native", [
    ("x86_64", True, True, False, True),     # AVX512-BF16
    ("x86_64", True, False, True, True),     # AMX
    ("x86_64", True, False, False, False),   # AVX-512 without them: oneDNN emulates bf16
    ("x86_64", False, False, False, False),  # AVX2
    ("aarch64", True, False, False, True),   # Arm with BF16: oneDNN's own answer
    ("aarch64", None, False, False, False),  # a torch without the probe
])
def test_native_bf16_detection(monkeypatch, machine, mkldnn, avx512_bf16, amx, native):
    def probe():
        if mkldnn is None:
            raise AttributeError("no such op")
        return mkldnn

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", probe, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(devices.platform, "machine", lambda: machine)
    assert devices.cpu_has_native_bf16() is native


def resumed(stored: dict, *argv) -> dict:
    args, given = main.parse_args(["--resume", "somewhere", *argv])
    fresh = main.resolve_config(main.parse_args(["--arch", "tiny"])[0])
    required = {key: fresh[key] for key in main.REQUIRED_KEYS}  # a config main.py would accept
    return main.resumed_config({**required, "device": "cpu", **stored}, args, given, "run")


def test_a_resumed_run_resolves_auto_again_and_keeps_a_precision_asked_for(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    # Started with auto where bf16 was native (a GPU), resumed on a CPU without it: fp32.
    config = resumed({"precision": "bf16", "amp_requested": "auto"})
    assert config["precision"] == "none"
    assert config["resumes"] == [{"changed": {"precision": ["bf16", "none"]}}]
    # Asked for bf16, or a config from before amp_requested: the run keeps bf16.
    for stored in ({"precision": "bf16", "amp_requested": "bf16"}, {"precision": "bf16"}):
        config = resumed(stored)
        assert config["precision"] == "bf16" and "resumes" not in config
    # The layout before that kept the flag under "amp": auto resolves again.
    assert resumed({"amp": "auto", "precision": "bf16"})["precision"] == "none"
    # --amp given again wins, and is what a later resume resolves.
    config = resumed({"precision": "none", "amp_requested": "auto"}, "--amp", "bf16")
    assert (config["precision"], config["amp_requested"]) == ("bf16", "bf16")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    config = resumed({"precision": "bf16", "amp_requested": "auto"})
    assert config["precision"] == "bf16" and "resumes" not in config


def test_a_run_from_a_bf16_machine_resumes_in_fp32_here_and_says_so(mnist_root, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    run = tmp_path / "run"
    main.main(quick(mnist_root, run, "--epochs", "1"))
    assert (config_of(run)["precision"], config_of(run)["amp_requested"]) == ("none", "auto")
    # Make it a run that --amp auto started in bf16 on another machine.
    from checkpoints import atomic_save, write_json
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(run / "checkpoints" / name)
        ckpt["config"]["precision"] = "bf16"
        atomic_save(ckpt, run / "checkpoints" / name)
    write_json(run / "config.json", {**config_of(run), "precision": "bf16"})
    capsys.readouterr()
    main.main(quick(mnist_root, run, "--epochs", "2", "--resume"))
    config = config_of(run)
    assert config["precision"] == "none"
    assert config["resumes"][-1]["changed"]["precision"] == ["bf16", "none"]
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("precision")]
    assert len(said) == 1 and "bf16 -> none" in said[0] and "--amp bf16 to keep" in said[0]
    assert [r["epoch"] for r in lines(run)] == [1, 2]
