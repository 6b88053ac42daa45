"""torchrun with 2 CPU processes (gloo on 127.0.0.1) against one process, tiny preset: the
same numbers, one run folder, exact resume after a budget stop or SIGTERM, and the process
count as part of the experiment."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import main
from checkpoints import load_checkpoint
from devices import autocast_context
from helpers import SLOW_STEPS, said, steps_done
from model import build_model

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # torchrun launches


def common(mnist_root):
    return ["--arch", "tiny", "--device", "cpu", "--data-root", str(mnist_root), "--no-download",
            "--workers", "0", "--epoch-size", "4", "--val-size", "4", "--log-every", "1",
            "--frames-input", "3", "--frames-output", "3", "--thresholds", "0.1", "0.3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(*args, nproc=2, script="main.py"):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           str(script), *map(str, args)]
    return cmd, env


def torchrun(*args, nproc=2):
    cmd, env = torchrun_command(*args, nproc=nproc)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def lines(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_root):
    root = tmp_path_factory.mktemp("ddp")
    flags = common(mnist_root)
    # 2 processes of batch 1 versus 1 process of batch 2: the same global batches.
    torchrun(*flags, "--batch-size", "1", "--epochs", "2", "--out-dir", str(root / "two"))
    main.main([*flags, "--batch-size", "2", "--epochs", "2", "--out-dir", str(root / "one")])
    # Stopped mid-epoch by the time budget, then resumed by the same command.
    torchrun(*flags, "--batch-size", "1", "--epochs", "2", "--out-dir", str(root / "split"),
             "--time-budget", "1e-6")
    torchrun(*flags, "--batch-size", "1", "--epochs", "2", "--out-dir", str(root / "split"),
             "--resume")
    return root


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    two = load_checkpoint(runs / "two" / "checkpoints" / "last.pt")
    one = load_checkpoint(runs / "one" / "checkpoints" / "last.pt")
    assert two["step"] == one["step"] == 4
    assert two["config"]["world_size"] == 2 and two["config"]["batch_size"] == 1
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, atol=1e-5, rtol=1e-4, msg=name)
    for a, b in zip(lines(runs / "two"), lines(runs / "one")):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_one_run_folder_written_by_rank_zero_only(runs):
    run = runs / "two"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert [l["epoch"] for l in lines(run)] == [1, 2]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert len([p for p in runs.iterdir()]) == 3  # two, one, split: no stray folders


def validate_alone(run, batch_size: int, scored: bool = False):
    """A run's last checkpoint validated by one process on the whole validation set;
    `scored`: with the run's nowcasting scores."""
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    config = ckpt["config"]
    model = build_model(config["model"])
    model.load_state_dict(ckpt["model"])
    _, val_set = main.make_datasets(config)
    cpu = torch.device("cpu")
    scoring = main.scoring(config) if scored else {}
    return main.validate(model, DataLoader(val_set, batch_size=batch_size), cpu,
                         autocast_context(cpu, "none"), 3, **scoring)


def test_validation_metrics_equal_a_single_process_evaluation(runs):
    val_loss, metrics, _ = validate_alone(runs / "two", 3)
    last = lines(runs / "two")[-1]
    assert last["val_loss"] == pytest.approx(val_loss, rel=1e-5)
    for k in ("mse", "mae", "ssim", "psnr", "ssim_openstl"):
        assert last[k] == pytest.approx(metrics[k], rel=1e-5), k


def test_nowcasting_scores_count_every_process_shard(runs):
    """The contingency counts are all-reduced: two processes' CSI equals one process scoring
    the whole validation set (to a pixel or so: the two batch their shards differently)."""
    _, metrics, _ = validate_alone(runs / "two", 4, scored=True)
    recorded = lines(runs / "two")[-1]["thresholds"]
    assert set(recorded) == {"0.1", "0.3"}
    for key, scores in metrics["thresholds"].items():
        for name in ("pod", "far", "csi", "hss", "bias"):
            want = scores["per_frame"][name]
            got = recorded[key]["per_frame"][name]
            assert [v is None for v in got] == [v is None for v in want], (key, name)
            assert [v for v in got if v is not None] == pytest.approx(
                [v for v in want if v is not None], abs=1e-3), (key, name)


def test_stopped_and_resumed_two_process_run_continues_exactly(runs):
    straight, split = lines(runs / "two"), lines(runs / "split")
    assert [l["epoch"] for l in split] == [1, 2]
    for a, b in zip(straight, split):
        for k in ("train_loss", "val_loss", "mse", "ssim"):
            assert a[k] == b[k], k
    a = load_checkpoint(runs / "two" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(runs / "split" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_move_between_process_counts(runs, tmp_path):
    # Written by 2 processes, resumed by 1 ...
    shutil.copytree(runs / "split", tmp_path / "to_one")
    ckpt = load_checkpoint(tmp_path / "to_one" / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2
    # (with the --batch-size that keeps the global batch: the process count is part of the
    # experiment, and a resume that changes it is recorded)
    result = main.main(["--resume", str(tmp_path / "to_one"), "--epochs", "3", "--workers", "0",
                        "--batch-size", "2"])
    assert result["epoch"] == 3
    resumed = json.loads((tmp_path / "to_one" / "config.json").read_text())["resumes"][-1]["changed"]
    assert resumed["world_size"] == [2, 1] and resumed["batch_size"] == [1, 2]
    # ... and written by 1, resumed by 2.
    shutil.copytree(runs / "one", tmp_path / "to_two")
    torchrun("--resume", "--out-dir", str(tmp_path / "to_two"), "--epochs", "3", "--batch-size", "1")
    assert [l["epoch"] for l in lines(tmp_path / "to_two")] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "to_two" / "checkpoints" / "last.pt")["config"]["world_size"] == 2


def test_sigterm_to_torchrun_saves_mid_epoch_on_rank_0_and_the_resume_equals_no_stop(runs, mnist_root,
                                                                                      tmp_path):
    """torchrun passes SIGTERM to its processes and kills them 30 s later: they must agree on
    a stop within a step (--log-every 100: not at a log point) and save in time."""
    run, steps, script = tmp_path / "run", tmp_path / "steps", tmp_path / "slow_steps.py"
    script.write_text(SLOW_STEPS)
    flags = [*common(mnist_root), "--batch-size", "1", "--epochs", "2", "--out-dir", str(run)]
    cmd, env = torchrun_command(steps, 1.0, *flags, "--log-every", "100", script=script)
    err = tmp_path / "stderr.txt"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err.open("w"))
    while steps_done(steps) < 3:  # the first step of epoch 2, in its pause
        assert proc.poll() is None, err.read_text()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # to the torchrun agent only
    sent, last = time.time(), run / "checkpoints" / "last.pt"
    while not last.exists() and time.time() < sent + 30:
        time.sleep(0.05)
    assert time.time() - sent < 10, err.read_text()[-3000:]
    proc.wait(timeout=120)
    told = [line for line in said(err.read_text()) if line.startswith("interrupted: stopped by SIGTERM")]
    assert told and "torchrun --nproc_per_node=2 main.py --resume" in told[0]
    state = load_checkpoint(last)
    assert (state["epoch"], state["position"], state["step"]) == (1, 2, 3)  # mid-epoch, on rank 0
    torchrun(*flags, "--resume")
    straight, resumed = lines(runs / "two"), lines(run)
    assert [l["epoch"] for l in resumed] == [1, 2]
    for a, b in zip(straight, resumed):
        for k in ("train_loss", "val_loss", "mse", "ssim"):
            assert a[k] == b[k], k
    a = load_checkpoint(runs / "two" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(last)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
