"""Faults of real processes, then resume: kill -9 at every rename of a checkpoint, metrics
or config write and at 20 seeded random instants; every stop signal to a process group with
DataLoader workers; a worker killed as for memory; a full disk; a log that can't be
written. Every folder must resume; metrics.jsonl must then hold each finished epoch once,
best.pt the best of them, no temp file may be left, and the final numbers must equal
those of a run that was never stopped. (tests/test_accidents.py has the in-process cases.)"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
from checkpoints import load_checkpoint
from helpers import SLOW_STEPS, said, steps_done

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


def resume_and_check(run, reference_run, mnist_root, *extra):
    main.main(command(mnist_root, run) + [*extra, "--resume"])
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


# ----------------------------------------------------------------------------------------
# Signals, dead workers, full disks, lost logs

# Kills its DataLoader worker, as the OOM killer does, when it is asked for the third
# sequence of epoch 2.
KILL_A_WORKER = """
import os, signal, sys
import main
from data.mm import MovingMNIST
from torch.utils.data import get_worker_info
from utils import run_cli
real = MovingMNIST.__getitem__
def item(self, key):
    if get_worker_info() is not None and key == (1, 2):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, key)
MovingMNIST.__getitem__ = item
sys.exit(run_cli(main.main, sys.argv[1:]))
"""


def child(tmp_path, code, *argv, **popen):
    """Start `code` as a script with the repository importable; stderr goes to a file."""
    script = tmp_path / "child.py"
    script.write_text(code)
    err = tmp_path / "stderr.txt"
    popen.setdefault("stdout", subprocess.DEVNULL)
    proc = subprocess.Popen([sys.executable, str(script), *map(str, argv)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=err.open("w"), **popen)
    return proc, err


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1"])
def test_a_stop_signal_to_the_process_group_saves_mid_epoch_and_resumes_exactly(
        name, reference, mnist_root, tmp_path):
    """What scancel and a job's end (SIGTERM), Ctrl-C (SIGINT), a closed ssh session (SIGHUP)
    and Slurm's --signal=USR1 do: signal every process of the group, DataLoader workers too.
    (The resume after any of them is the same; it is run after SIGTERM's.)"""
    if not hasattr(signal, name):
        pytest.skip(f"{name} doesn't exist on this platform")
    number, run, steps = getattr(signal, name), tmp_path / "run", tmp_path / "steps"
    proc, err = child(tmp_path, SLOW_STEPS, steps, 0.5, *command(mnist_root, run), "--workers", "2",
                      start_new_session=True)
    while steps_done(steps) < 2:
        assert proc.poll() is None, err.read_text()[-2000:]
        time.sleep(0.02)
    os.killpg(proc.pid, number)
    assert proc.wait(timeout=120) == 128 + number, err.read_text()[-2000:]
    told = said(err.read_text())
    assert len(told) == 1 and told[0].startswith(f"interrupted: stopped by {name}") and "--resume" in told[0]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and 0 < state["position"] < 8  # saved mid-epoch
    if name == "SIGTERM":
        resume_and_check(run, reference[0], mnist_root, "--workers", "2")


def test_a_worker_killed_for_memory_stops_the_run_with_one_line(reference, mnist_root, tmp_path):
    run = tmp_path / "run"
    proc, err = child(tmp_path, KILL_A_WORKER, *command(mnist_root, run), "--workers", "2")
    assert proc.wait(timeout=300) == 1
    told, text = said(err.read_text()), err.read_text()
    assert len(told) == 1 and "DataLoader worker" in told[0] and "killed by signal" in told[0], text
    assert "last.pt holds the last state saved" in told[0] and "Traceback" not in text
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["position"]) == (1, 0)  # the end of epoch 1: the last good state
    resume_and_check(run, reference[0], mnist_root)


def test_a_full_disk_is_one_line_and_resume_after_freeing_space_is_exact(reference, mnist_root, tmp_path,
                                                                         capsys):
    reference_run = reference[0]
    size = (reference_run / "checkpoints" / "last.pt").stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={4 * size // 2 ** 20 + 4}m", "tmpfs",
                              str(disk)], capture_output=True, text=True) if shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip(f"can't mount a tmpfs here ({mounted.stderr.strip() if mounted else 'no mount'})")
    try:
        # Room for epoch 1's last.pt and best.pt, not for epoch 2's last.pt beside them.
        filler = disk / "filler"
        filler.write_bytes(bytes(int(shutil.disk_usage(disk).free - 2.5 * size)))
        run = disk / "run"
        assert main.run_cli(main.main, command(mnist_root, run)) == 1
        err = capsys.readouterr().err
        told = said(err)
        assert len(told) == 1 and "Traceback" not in err, err
        assert f"can't write {run / 'checkpoints' / 'last.pt'}" in told[0] and "the disk may be full" in told[0]
        assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
        filler.unlink()
        resume_and_check(run, reference_run, mnist_root)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.parametrize("streams", ["a full disk", "a dead pipe"])
def test_a_log_that_cant_be_written_never_stops_training(streams, mnist_root, tmp_path):
    """`nohup main.py > log 2>&1` on a full disk, or `main.py 2>&1 | tee log` after tee died:
    stdout and stderr both fail."""
    if "full" in streams and not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    run = tmp_path / "run"
    if "full" in streams:
        sink = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
    else:
        read, sink = os.pipe()
        os.close(read)  # every write fails with EPIPE
    done = subprocess.run([sys.executable, "main.py", *command(mnist_root, run), "--epochs", "1"],
                          cwd=REPO, timeout=300, stdout=sink, stderr=sink)
    os.close(sink)
    assert done.returncode == 0
    assert [r["epoch"] for r in records(run)] == [1]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
