"""Bad input, as users give it, to every command line: main.py, evaluate.py,
`python -m data.mm`, tools/convert_original.py, and edits of net_params.py.

Each case must end with exit code 1 and exactly one `error: ...` line that names the flag
or file, no traceback, and no run folder left behind, before any training starts.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import main
import net_params
from data import mm
from helpers import said
from tools import convert_original
from utils import run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(mnist_root, tmp_path_factory):
    """Things a user points the commands at, good and bad."""
    d = tmp_path_factory.mktemp("files")
    (d / "empty").mkdir()
    (d / "a_file").write_text("not a folder")
    (d / "dir.npy").mkdir()
    (d / "notes.pt").write_text("not a checkpoint")
    np.save(d / "3d.npy", np.zeros((4, 8, 32), np.uint8))
    np.save(d / "short.npy", np.zeros((4, 5, 32, 32), np.uint8))
    np.save(d / "odd.npy", np.zeros((8, 8, 30, 30), np.uint8))
    np.save(d / "test_3d.npy", np.zeros((20, 3, 64), np.uint8))
    (d / "cut.npy").write_bytes((d / "short.npy").read_bytes()[:200])
    rng = np.random.default_rng(0)
    good = rng.random((6, 20, 32, 32), dtype=np.float32)
    np.save(d / "good.npy", good)
    np.save(d / "two_channels.npy", rng.random((3, 20, 2, 64, 64), dtype=np.float32))
    np.save(d / "small_frames.npy", rng.integers(0, 255, (20, 3, 32, 32), dtype=np.uint8))
    good.flat[[5, 700, 9000]] = np.nan
    np.save(d / "nan.npy", good)
    np.savez(d / "objects.npz", sequences=np.array([{"frames": 1}, None], dtype=object))
    np.save(d / "empty.npy", np.zeros((0, 8, 32, 32), np.uint8))
    main.main(["--arch", "tiny", "--device", "cpu", "--data-root", str(mnist_root), "--no-download",
               "--out-dir", str(d / "run"), "--workers", "0", "--dry-run", "--frames-input", "2",
               "--frames-output", "2"])
    ckpt = torch.load(d / "run" / "checkpoints" / "last.pt", weights_only=True)
    torch.save({"model": ckpt["model"], "config": ckpt["config"]}, d / "no_optimizer.pt")
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if "head" not in k}
    torch.save(ckpt, d / "cut_weights.pt")
    return d


def edited_preset(edit):
    preset = copy.deepcopy(net_params.PRESETS["tiny"])
    edit(preset)
    return preset


TRAIN = "main"
# (command, arguments, a word the one error line must hold); {d} is the files folder,
# {m} the MNIST folder, {out} a folder that must not be left behind.
CASES = [
    (TRAIN, ["--batch-size", "0"], "--batch-size must be >= 1"),
    (TRAIN, ["--batch-size", "x"], "--batch-size: invalid int value"),
    (TRAIN, ["--val-size", "0"], "--val-size must be >= 1"),
    (TRAIN, ["--epoch-size", "0"], "--epoch-size must be >= 1"),
    (TRAIN, ["--epochs", "0"], "--epochs must be >= 1"),
    (TRAIN, ["--workers", "-1"], "--workers must be >= 0"),
    (TRAIN, ["--lr", "0"], "--lr must be > 0"),
    (TRAIN, ["--lr=-1e-3"], "--lr must be > 0"),
    (TRAIN, ["--lr", "nan"], "--lr must be > 0"),
    (TRAIN, ["--lr", "inf"], "--lr must be finite"),
    (TRAIN, ["--clip", "-1"], "--clip must be > 0"),
    (TRAIN, ["--clip", "0"], "--clip inf"),
    (TRAIN, ["--patience", "0"], "--patience must be >= 1"),
    (TRAIN, ["--time-budget", "-1"], "--time-budget must be > 0"),
    (TRAIN, ["--time-budget", "0"], "--time-budget must be > 0"),
    (TRAIN, ["--frames-input", "0"], "--frames-input must be >= 1"),
    (TRAIN, ["--frames-output", "0"], "--frames-output must be >= 1"),
    (TRAIN, ["--num-digits", "0"], "--num-digits must be >= 1"),
    (TRAIN, ["--seed", "-1"], "--seed must be >= 0"),
    (TRAIN, ["--log-every", "0"], "--log-every must be >= 1"),
    (TRAIN, ["--holdout-fraction", "1.5"], "--holdout-fraction must be in (0, 1)"),
    (TRAIN, ["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (TRAIN, ["--warmup", "1.5", "--schedule", "cosine"], "--warmup must be in [0, 1)"),
    (TRAIN, ["--warmup", "0.1", "--schedule", "plateau"], "--warmup needs --schedule cosine or onecycle"),
    (TRAIN, ["--schedule", "linear"], "--schedule: invalid choice"),
    (TRAIN, ["--optimizer", "sgd"], "--optimizer: invalid choice"),
    (TRAIN, ["--loss", "l2"], "--loss: invalid choice"),
    (TRAIN, ["--amp", "fp8"], "--amp: invalid choice"),
    (TRAIN, ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (TRAIN, ["--arch", "convlsmt"], "unknown preset 'convlsmt'"),
    (TRAIN, ["--device", "gpu"], "--device 'gpu' is not a device name"),
    (TRAIN, ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"],
     "--device cuda"),
    (TRAIN, ["--amp", "fp16"], "--amp fp16 needs a CUDA device"),
    (TRAIN, ["--amp", "bf16", "--conv", "winograd"], "--conv winograd runs in fp32 only"),
    (TRAIN, ["--out-dir", "{d}/a_file"], "a_file is a file"),
    (TRAIN, ["--out-dir", "{d}/run"], "already holds a run; add --resume"),
    (TRAIN, ["--data-root", "{d}/empty"], "no MNIST digits in"),
    (TRAIN, ["--data-root", "{d}/a_file"], "--data-root {d}/a_file is a file"),
    (TRAIN, ["--train-data", "{d}/empty"], "expected a .npy or .npz file"),
    (TRAIN, ["--train-data", "{d}/dir.npy"], "dir.npy is a directory"),
    (TRAIN, ["--train-data", "{d}/missing.npy"], "missing.npy: no such file"),
    (TRAIN, ["--train-data", "{d}/3d.npy"], "3d.npy: shape (4, 8, 32) is 3-D"),
    (TRAIN, ["--train-data", "{d}/short.npy", "--layout", "NTHW"], "don't fit in sequences of 5 frames"),
    (TRAIN, ["--train-data", "{d}/short.npy", "--layout", "NTHW"],
     "--train-data {d}/short.npy: 10 input + 10 output frames (--frames-input, --frames-output)"),
    (TRAIN, ["--train-data", "{d}/odd.npy", "--layout", "NTHW"], "--train-data frames are 30x30"),
    # your own data (issue 20) and its faults (issue 21)
    (TRAIN, ["--train-data", "{d}/good.npy"], "good.npy: shape (6, 20, 32, 32) is 4-D; name its axes with --layout, e.g. NTHW"),
    (TRAIN, ["--train-data", "{d}/good.npy", "--layout", "NTCHW"], "layout NTCHW needs 5 dimensions"),
    (TRAIN, ["--train-data", "{d}/good.npy", "--layout", "NTXY"], "--layout: invalid choice"),
    (TRAIN, ["--train-data", "{d}/good.npy", "--layout", "TNHW"],
     "good.npy: 10 input + 10 output frames (--frames-input, --frames-output) don't fit in sequences of 6"),
    (TRAIN, ["--train-data", "{d}/nan.npy", "--layout", "NTHW"], "nan.npy: 3 of 122,880 values are NaN"),
    (TRAIN, ["--train-data", "{d}/nan.npy", "--layout", "NTHW", "--fill-nan", "2"],
     "--fill-nan 2 lies outside the value range [0, 1]"),
    (TRAIN, ["--train-data", "{d}/good.npy", "--layout", "NTHW", "--value-range", "70", "0"],
     "--value-range 70 0: LO must be below HI"),
    (TRAIN, ["--train-data", "{d}/good.npy", "--layout", "NTHW", "--value-range", "5", "5"],
     "--value-range 5 5: LO must be below HI"),
    (TRAIN, ["--train-data", "{d}/good.npy", "--layout", "NTHW", "--value-range", "0", "70",
             "--thresholds", "20", "80"], "--thresholds 80 lies outside the value range [0, 70]"),
    (TRAIN, ["--thresholds", "2"], "--thresholds 2 lies outside the value range [0, 1]"),
    (TRAIN, ["--thresholds", "0.5", "0.5"], "--thresholds names a threshold twice"),
    (TRAIN, ["--loss", "b-mse"], "--balance-thresholds 2 lies outside the value range [0, 1]"),
    (TRAIN, ["--balanced", "--balance-thresholds", "0.2", "0.5", "--balance-weights", "1", "2"],
     "--balance-weights needs 3 weights"),
    (TRAIN, ["--value-range", "0", "1"], "--value-range describes --train-data"),
    (TRAIN, ["--layout", "NTHW"], "--layout describes --train-data"),
    (TRAIN, ["--train-data", "{d}/objects.npz"], "objects.npz: holds Python objects"),
    (TRAIN, ["--train-data", "{d}/empty.npy"], "empty.npy: the array is empty, shape (0, 8, 32, 32)"),
    (TRAIN, ["--train-data", "{d}/good.npy", "--layout", "NTHW", "--epoch-size", "4"],
     "--epoch-size sets Moving MNIST's sizes; with --train-data"),
    (TRAIN, ["--train-data", "{d}/good.npy", "--layout", "NTHW", "--val-size", "2"],
     "--val-size sets Moving MNIST's sizes"),
    (TRAIN, ["--train-data", "{d}/cut.npy"], "cut.npy: not a readable .npy file"),
    (TRAIN, ["--epoch-size", "1", "--batch-size", "2"], "gives no full batch of 2"),
    (TRAIN, ["--resume", ""], "--resume '' names no run"),
    (TRAIN, ["--resume", "{d}/missing"], "--resume {d}/missing: no such file or folder"),
    (TRAIN, ["--resume", "{d}/empty"], "not a run folder"),
    (TRAIN, ["--resume", "{d}/notes.pt", "--out-dir", "{out}"], "notes.pt is not a checkpoint"),
    (TRAIN, ["--resume", "{d}/no_optimizer.pt", "--out-dir", "{out}"], "holds no optimizer state"),
    (TRAIN, ["--resume", "{d}/run", "--frames-input", "5"], "--frames-input was 2"),
    (TRAIN, ["--arch", "typo_options"], "take no option 'peepole'"),
    (TRAIN, ["--arch", "bad_chain"], "stage 2: down conv expects 16 input channels"),
    (TRAIN, ["--arch", "bad_size"], "does not divide"),
    (TRAIN, ["--arch", "bad_head"], "head_activation"),
    ("evaluate", ["--checkpoint", "{d}/missing.pt"], "missing.pt is not a checkpoint"),
    ("evaluate", ["--checkpoint", "{d}/empty"], "it is a directory"),
    ("evaluate", ["--checkpoint", "{d}/notes.pt"], "notes.pt is not a checkpoint"),
    ("evaluate", ["--checkpoint", "{d}/cut_weights.pt"], "cut_weights.pt: its weights don't fit"),
    ("evaluate", ["--checkpoint", "{d}/run/checkpoints/last.pt", "--json", "{d}/empty"],
     "--json {d}/empty is a directory"),
    ("evaluate", ["--checkpoint", "{d}/run/checkpoints/last.pt", "--gif", "{d}/empty"],
     "--gif {d}/empty is a directory"),
    ("evaluate", ["--checkpoint", "{d}/run/checkpoints/last.pt", "--test-set", "{d}/test_3d.npy"],
     "test_3d.npy: found uint8 (20, 3, 64)"),
    ("evaluate", ["--checkpoint", "{d}/run/checkpoints/last.pt", "--test-set", "{d}/missing.npy"],
     "missing.npy: no such file"),
    ("evaluate", ["--checkpoint", "{d}/run/checkpoints/last.pt", "--num", "0"], "--num"),
    ("evaluate", ["--checkpoint", "{d}/run/checkpoints/last.pt", "--num-digits", "0"],
     "--num-digits must be >= 1"),
    ("evaluate", ["--checkpoint", "{d}/run/checkpoints/last.pt", "--amp", "fp16"],
     "--amp fp16 needs a CUDA device"),
    ("evaluate", ["--checkpoint", "{d}/run/checkpoints/last.pt", "--data-root", "{d}/empty"],
     "no MNIST digits in"),
    ("evaluate", ["--layout", "XYZ", "--checkpoint", "x"], "--layout: invalid choice"),
    ("evaluate", ["--checkpoint", "{d}/run/checkpoints/last.pt", "--thresholds", "2"],
     "--thresholds 2 lies outside the value range [0, 1]"),
    ("evaluate", ["--checkpoint", "{d}/run/checkpoints/last.pt", "--baselines", "copy-last,persistence"],
     "--baselines copy-last,persistence: unknown baseline 'persistence'"),
    ("evaluate", ["--checkpoint", "{d}/run/checkpoints/last.pt", "--balanced"],
     "--balance-thresholds 2 lies outside the value range [0, 1]"),
    ("evaluate", ["--checkpoint", "{d}/run/checkpoints/last.pt", "--test-set", "{d}/two_channels.npy",
                  "--layout", "NTCHW"], "two_channels.npy has 2 channels but"),
    ("evaluate", ["--checkpoint", "{d}/run/checkpoints/last.pt", "--test-set", "{d}/two_channels.npy",
                  "--layout", "NTHW"], "two_channels.npy: shape (3, 20, 2, 64, 64) is 5-D, but layout NTHW"),
    ("evaluate", ["--checkpoint", "{d}/run/checkpoints/last.pt", "--test-set", "{d}/small_frames.npy"],
     "small_frames.npy has frames of 32x32 but {d}/run/checkpoints/last.pt was trained on 64x64"),
    ("evaluate", ["--checkpoint", "{d}/run/checkpoints/last.pt", "--test-set", "{d}/nan.npy",
                  "--layout", "NTHW"], "nan.npy: 3 of 122,880 values are NaN"),
    ("data.mm", [], "the following arguments are required: command"),
    ("data.mm", ["make-test-set", "--out", "{d}/t.npy", "--num", "0"], "--num must be >= 1"),
    ("data.mm", ["make-test-set", "--out", "{d}/empty"], "--out {d}/empty is a directory"),
    ("data.mm", ["make-test-set", "--out", "{d}/t.txt"], "must end in .npy"),
    ("data.mm", ["make-test-set", "--out", "{d}/t.npy", "--image-size", "20"], "--image-size must be >= 28"),
    ("data.mm", ["make-test-set", "--out", "{d}/t.npy", "--root", "{d}/empty", "--no-download"],
     "no MNIST digits in"),
    ("convert", ["{d}/missing.pth.tar", "--arch", "convlstm", "--out", "{d}/c.pt"], "missing.pth.tar"),
    ("convert", ["{d}/notes.pt", "--arch", "convlstm", "--out", "{d}/c.pt"], "notes.pt"),
    ("convert", ["{d}/run/checkpoints/last.pt", "--arch", "tiny", "--out", "{d}/c.pt"],
     "--arch: invalid choice"),
    ("convert", ["{d}/run/checkpoints/last.pt", "--arch", "convlstm", "--out", "{d}/c.pt"], "last.pt"),
]
COMMANDS = {"main": main.main, "evaluate": evaluate.main, "data.mm": mm.main,
            "convert": convert_original.main}


@pytest.mark.parametrize("command, argv, words", CASES,
                         ids=[f"{c}:{' '.join(a)[:40]}" for c, a, _ in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(command, argv, words, files, mnist_root, tmp_path,
                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would appear here
    monkeypatch.setitem(net_params.PRESETS, "typo_options", edited_preset(
        lambda p: setattr(p, "cell_options", {"peepole": True})))
    monkeypatch.setitem(net_params.PRESETS, "bad_chain", edited_preset(
        lambda p: setattr(p.stages[1].down, "in_channels", 16)))
    monkeypatch.setitem(net_params.PRESETS, "bad_size", edited_preset(
        lambda p: setattr(p, "image_size", 66)))
    monkeypatch.setitem(net_params.PRESETS, "bad_head", edited_preset(
        lambda p: setattr(p, "head_activation", "relu")))
    out = tmp_path / "out"
    fill = lambda s: s.format(d=files, m=mnist_root, out=out)
    argv = [fill(a) for a in argv]
    if command == TRAIN and "--resume" in argv:
        argv = ["--device", "cpu", "--workers", "0", *argv]
    elif command == TRAIN:
        sizes = ["--epoch-size", "4", "--val-size", "2"] if "--train-data" not in argv else []
        argv = ["--arch", "tiny", "--device", "cpu", "--data-root", str(mnist_root), "--no-download",
                "--workers", "0", "--batch-size", "2", *sizes,
                *(["--out-dir", str(out)] if "--out-dir" not in argv and "--resume" not in argv else []),
                *argv]
    before = sorted(p.name for p in files.iterdir())
    assert run_cli(COMMANDS[command], argv) == 1
    err = capsys.readouterr().err
    lines = said(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fill(words) in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / "runs").exists()
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written beside them


def test_the_table_is_long_enough():
    assert len(CASES) >= 40 and {c for c, _, _ in CASES} == set(COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["main.py", "--batch-size", "0"],
    ["evaluate.py", "--checkpoint", "missing.pt"],
    ["-m", "data.mm", "make-test-set", "--out", "t.npy", "--num", "0"],
    ["tools/convert_original.py", "missing.pth.tar", "--arch", "convlstm", "--out", "c.pt"],
    ["tools/bench.py", "--amp", "fp16", "--device", "cpu"],
])
def test_the_scripts_themselves_exit_1_with_one_line(argv, tmp_path):
    script = [str(REPO / argv[0])] if argv[0].endswith(".py") else argv[:2]
    rest = argv[1:] if argv[0].endswith(".py") else argv[2:]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, *script, *rest], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert len(said(done.stderr)) == 1 and "Traceback" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
