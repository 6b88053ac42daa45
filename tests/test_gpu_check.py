"""tools/gpu_check.sh --smoke: the GPU check's steps on the CPU at tiny sizes, so that the
script works the day a GPU is at hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_mode_runs_every_step_and_writes_its_table(mnist_root, tmp_path):
    out = tmp_path / "check"
    done = subprocess.run(["bash", "tools/gpu_check.sh", "--smoke", "--out", str(out),
                           "--data-root", str(mnist_root)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "failed.txt").read_text() == ""
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] and "gpus" in env
    summary = (out / "summary.md").read_text()
    # the textbook step and the four measured settings, each with a speed-up
    rows = [line for line in summary.splitlines() if line.startswith("| tiny | 2 |")]
    assert len(rows) == 5 and all(line.split("|")[8].strip().endswith("x") for line in rows)
    assert "textbook fp32" in rows[0] and "channels_last" in summary and "to compile" in summary
    assert "`python main.py` with the defaults" in summary
    scores = json.loads((out / "evaluate.json").read_text())
    assert scores["sequences"] == 8 and f"| model | {scores['model']['mse']:.2f} |" in summary


def test_a_bad_argument_is_one_line(tmp_path):
    done = subprocess.run(["bash", "tools/gpu_check.sh", "--fast"], cwd=REPO, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1 and done.stderr.strip() == "error: unknown argument --fast (see --help)"
