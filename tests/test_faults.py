"""kill -9 a training run, then resume it: at every rename of a checkpoint, metrics or
config write, and at 20 seeded random instants. Every folder must resume; metrics.jsonl
must then hold each finished epoch once, best.pt the best of them, no temp file may be
left, and the final numbers must equal those of a run that was never killed."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
from checkpoints import load_checkpoint

pytestmark = pytest.mark.slow  # about 30 training processes

REPO = Path(__file__).resolve().parents[1]
EXACT = ("epoch", "step", "train_loss", "val_loss", "lr")
# Metrics of equal predictions, from numpy and scikit-image reductions whose last bits can
# vary between processes on some CPUs (SIMD loops that depend on memory alignment).
METRICS = ("mse", "mae", "ssim", "psnr", "ssim_openstl")

# Runs main.main in a child that kills itself (SIGKILL: no cleanup, no finally) just before
# its N-th os.replace, i.e. with the N-th atomic write's temp file complete but not renamed.
KILL_AT_RENAME = """
import os, signal, sys
import main
real, count = os.replace, [0]
def replace(*args, **kwargs):
    count[0] += 1
    if count[0] == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
os.replace = replace
main.main(sys.argv[2:])
"""


def command(mnist_root, run):
    return ["--arch", "tiny", "--device", "cpu", "--data-root", str(mnist_root), "--no-download",
            "--out-dir", str(run), "--workers", "0", "--batch-size", "2", "--epoch-size", "8",
            "--val-size", "4", "--log-every", "1", "--frames-input", "3", "--frames-output", "3",
            "--epochs", "3"]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(mnist_root, tmp_path_factory):
    """An uninterrupted run, and how long a run takes after it creates its config."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    proc = subprocess.Popen([sys.executable, "main.py", *command(mnist_root, run)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (run / "config.json").exists() and proc.poll() is None:
        time.sleep(0.005)
    start = time.time()
    assert proc.wait(timeout=300) == 0
    return run, time.time() - start


def resume_and_check(run, reference_run, mnist_root):
    main.main(command(mnist_root, run) + ["--resume"])
    got, want = records(run), records(reference_run)
    assert [r["epoch"] for r in got] == [1, 2, 3]  # each finished epoch exactly once
    for a, b in zip(got, want):
        assert {k: a[k] for k in EXACT} == {k: b[k] for k in EXACT}
        assert {k: a[k] for k in METRICS} == pytest.approx({k: b[k] for k in METRICS}, rel=1e-9)
    best = min(got, key=lambda r: r["val_loss"])["epoch"]
    assert load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == best
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    a = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(reference_run / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_at_every_rename_is_repaired(reference, mnist_root, tmp_path):
    reference_run, _ = reference
    renames, killed = 0, 0
    for n in range(1, 40):
        run = tmp_path / f"rename{n}"
        done = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, str(n),
                               *command(mnist_root, run)], cwd=REPO, capture_output=True, timeout=300)
        if done.returncode == 0:  # fewer than n renames in a whole run: all covered
            renames = n - 1
            break
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
        killed += 1
        resume_and_check(run, reference_run, mnist_root)
    assert renames >= 10 and killed == renames  # config, metrics, then last/best/metrics an epoch


def test_20_kills_at_random_instants(reference, mnist_root, tmp_path):
    reference_run, duration = reference
    rng = random.Random(0)
    survived = 0
    for k in range(20):
        run = tmp_path / f"random{k}"
        proc = subprocess.Popen([sys.executable, "main.py", *command(mnist_root, run)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (run / "config.json").exists() and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, duration))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resume_and_check(run, reference_run, mnist_root)
        survived += 1
    assert survived == 20
