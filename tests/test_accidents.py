"""What clusters and accidents do to a run, in one process: folders that are not the run's,
stop signals, damaged checkpoints, a file system without flock or without space, another
process count, a diverging loss, sizes that can't fit, NaN in JSON, picture formats.

Each case asserts what the user needs: their files still there, a mid-epoch last.pt,
exactly one `error:` line and exit code 1, or a warning. tests/test_faults.py does the
same with real processes, process groups, torchrun and a full tmpfs.
"""

import copy
import errno
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import main
import net_params
from checkpoints import load_checkpoint
from data import mm
from helpers import said
from utils import run_cli


ONE_STEP = ("--time-budget", "1e-6")  # out of time at the first step: saves and stops


def small(mnist_root, run, *extra):
    """The flags of a few-second run: 4 steps of batch 2 an epoch, 4 validation sequences."""
    return ["--arch", "tiny", "--device", "cpu", "--data-root", str(mnist_root), "--no-download",
            "--out-dir", str(run), "--workers", "0", "--batch-size", "2", "--epoch-size", "8",
            "--val-size", "4", "--log-every", "1", "--frames-input", "3", "--frames-output", "3",
            *extra]


@pytest.fixture(scope="module")
def finished(mnist_root, tmp_path_factory):
    """A run of one finished epoch: config.json, events, metrics.jsonl, last.pt and best.pt."""
    run = tmp_path_factory.mktemp("accidents") / "run"
    main.main(small(mnist_root, run, "--epochs", "1"))
    return run


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run to damage."""
    shutil.copytree(finished, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    return tmp_path / "run"


def contents(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def one_error(capsys, code: int = 1) -> str:
    err = capsys.readouterr().err
    lines = said(err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def refused(capsys, command, argv, *words) -> str:
    assert run_cli(command, argv) == 1
    line = one_error(capsys)
    for word in words:
        assert word in line, line
    return line


def lines(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------
# Never delete what isn't provably the run's

def users_folder(run, finished):  # --out-dir . in a project that has nothing to do with runs
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "metrics.jsonl").write_text("my own metrics\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "model.pt").write_bytes(b"my own model")


def last_pt_gone(run, finished):  # deleted to save space, or not copied
    shutil.copytree(finished, run)
    (run / "checkpoints" / "last.pt").unlink()


def both_checkpoints_gone(run, finished):
    last_pt_gone(run, finished)
    (run / "checkpoints" / "best.pt").unlink()


def garbage_config(run, finished):
    run.mkdir()
    (run / "config.json").write_text("{'not': json")
    (run / "metrics.jsonl").write_text("")


def config_without_keys(run, finished):  # a start that failed before its first checkpoint, damaged
    run.mkdir()
    config = json.loads((finished / "config.json").read_text())
    del config["batch_size"], config["model"]
    (run / "config.json").write_text(json.dumps(config))


def checkpoints_is_a_file(run, finished):
    run.mkdir()
    (run / "checkpoints").write_text("mine")


def failed_start_with_users_file(run, finished):
    run.mkdir()
    config = json.loads((finished / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.jsonl").write_text("")
    (run / "results.csv").write_text("mine")


FOLDERS = [  # (make the folder, --resume?, words of the one error line)
    (users_folder, False, ["is not empty and not a run folder", "notes.txt"]),
    (users_folder, True, ["not a run folder"]),
    (last_pt_gone, False, ["has no checkpoints/last.pt", "--resume {run}/checkpoints/best.pt --out-dir"]),
    (last_pt_gone, True, ["has no checkpoints/last.pt", "--resume {run}/checkpoints/best.pt --out-dir"]),
    (both_checkpoints_gone, False, ["records 1 finished epoch", "another --out-dir"]),
    (both_checkpoints_gone, True, ["records 1 finished epoch", "another --out-dir"]),
    (garbage_config, False, ["{run}/config.json is not a run's config", "JSONDecodeError"]),
    (garbage_config, True, ["{run}/config.json is not a run's config"]),
    (config_without_keys, True, ["{run}/config.json lacks model, batch_size"]),
    (checkpoints_is_a_file, False, ["{run}/checkpoints is a file"]),
    (checkpoints_is_a_file, True, ["{run}/checkpoints is a file"]),
    (failed_start_with_users_file, False, ["files its run didn't write (results.csv)"]),
    (failed_start_with_users_file, True, ["files its run didn't write (results.csv)"]),
]


@pytest.mark.parametrize("make, resume, words", FOLDERS,
                         ids=[f"{m.__name__}{'-resume' * r}" for m, r, _ in FOLDERS])
def test_a_folder_that_is_not_provably_the_runs_is_refused_and_kept(make, resume, words, finished,
                                                                    mnist_root, tmp_path, capsys):
    run = tmp_path / "run"
    make(run, finished)
    before = contents(run)
    argv = small(mnist_root, run, "--epochs", "2", *["--resume"] * resume)
    refused(capsys, main.main, argv, *[w.format(run=run) for w in words])
    assert contents(run) == before  # every file still there, unchanged


def test_the_fork_command_of_a_run_without_last_pt_works(run, mnist_root, tmp_path, capsys):
    (run / "checkpoints" / "last.pt").unlink()
    line = refused(capsys, main.main, ["--resume", str(run), "--workers", "0"], "python main.py --resume")
    fork = tmp_path / "fork"
    command = line.split("python main.py ", 1)[1].replace("NEW_FOLDER", str(fork)).split()
    main.main(command + ["--epochs", "2", "--workers", "0", *ONE_STEP])
    assert lines(fork) == lines(run)  # epoch 1, as best.pt holds it
    state = load_checkpoint(fork / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 5)


def test_resume_of_a_relative_out_dir_from_another_folder_is_an_error(finished, mnist_root, tmp_path,
                                                                      monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    refused(capsys, main.main, small(mnist_root, "runs/x", "--resume"),
            f"there is no run at {elsewhere / 'runs' / 'x'}", "relative to")
    refused(capsys, main.main, ["--resume", str(tmp_path / "missing")], "no such file or folder")
    assert list(elsewhere.iterdir()) == []  # no new run started


def test_a_start_that_failed_cleans_up_only_the_files_its_config_lists(mnist_root, tmp_path,
                                                                       monkeypatch, capsys):
    run = tmp_path / "run"
    real_step = main.train_step
    monkeypatch.setattr(main, "train_step", lambda *a, **k: real_step(*a, **k) * float("nan"))
    assert run_cli(main.main, small(mnist_root, run, "--epochs", "1")) == 1  # nothing saved
    config = json.loads((run / "config.json").read_text())
    stale = list(run.glob("events.out.tfevents.*"))
    assert config["files"][0] == "metrics.jsonl" and len(stale) == 1
    assert stale[0].match(config["files"][1])  # the events file is named in config.json
    monkeypatch.setattr(main, "train_step", real_step)
    main.main(small(mnist_root, run, "--epochs", "1", "--resume", *ONE_STEP))
    events = list(run.glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0] != stale[0]  # the failed start's were its own
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1


# ----------------------------------------------------------------------------------------
# Save on every stop signal

@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGUSR1"])
def test_a_stop_signal_saves_mid_epoch_and_exits_128_plus_its_number(name, mnist_root, tmp_path,
                                                                     monkeypatch, capsys):
    if not hasattr(signal, name):
        pytest.skip(f"{name} doesn't exist on this platform")
    number, real_step, calls = getattr(signal, name), main.train_step, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), number)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(main, "train_step", step_then_signal)
    outside = signal.signal(number, lambda *args: None)  # were main.py's handler missing: not pytest's end
    try:
        assert run_cli(main.main, small(mnist_root, tmp_path / "run", "--epochs", "1")) == 128 + number
    finally:
        signal.signal(number, outside)
    told = said(capsys.readouterr().err)
    assert len(told) == 1 and told[0].startswith(f"interrupted: stopped by {name}") and "--resume" in told[0]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["position"], state["step"]) == (0, 4, 2)


# ----------------------------------------------------------------------------------------
# Damaged checkpoints, no flock, no space

def test_a_damaged_best_pt_is_set_aside_and_never_blocks_last_pt(run, mnist_root, capsys):
    damaged = b"half a checkpoint" * 50
    (run / "checkpoints" / "best.pt").write_bytes(damaged)
    main.main(small(mnist_root, run, "--epochs", "2", "--resume", *ONE_STEP))
    told = warnings_in(capsys.readouterr().err)
    assert len(told) == 1 and "best.pt is damaged" in told[0] and "rebuilt best.pt from last.pt" in told[0]
    assert (run / "checkpoints" / "best.pt.damaged").read_bytes() == damaged  # kept, not deleted
    assert load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == 1  # epoch 1: the best so far
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 5  # and last.pt went on


def test_a_damaged_last_pt_says_how_to_fork_from_best_pt(run, capsys):
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:5000])
    line = refused(capsys, main.main, ["--resume", str(run), "--workers", "0"],
                   f"{last} is damaged", "its best.pt (epoch 1) is intact",
                   f"python main.py --resume {run / 'checkpoints' / 'best.pt'} --out-dir NEW_FOLDER")
    assert len(line) < 400 + 3 * len(str(run))
    (run / "checkpoints" / "best.pt").write_bytes(b"damaged too")
    refused(capsys, main.main, ["--resume", str(run)], "no intact best.pt either")


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.EIO])
def test_a_file_system_without_flock_warns_and_trains(code, mnist_root, tmp_path, monkeypatch, capsys):
    fcntl = pytest.importorskip("fcntl")

    def no_flock(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    main.main(small(mnist_root, tmp_path / "run", "--epochs", "1", *ONE_STEP))
    told = warnings_in(capsys.readouterr().err)
    assert len(told) == 1 and "flock" in told[0] and os.strerror(code) in told[0]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 1


def full_disk(*args, **kwargs):
    """What torch.save and np.save do when the disk fills: an OSError, or torch's
    RuntimeError with the OSError as its context."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def test_a_full_disk_names_the_file_and_last_pt_stays_the_last_good_state(run, mnist_root,
                                                                          monkeypatch, capsys):
    before = contents(run)
    monkeypatch.setattr(torch, "save", full_disk)
    refused(capsys, main.main, small(mnist_root, run, "--epochs", "2", "--resume", *ONE_STEP),
            f"can't write {run / 'checkpoints' / 'last.pt'}: No space left on device",
            "the disk may be full", "last.pt holds the last state saved")
    assert contents(run)["checkpoints/last.pt"] == before["checkpoints/last.pt"]
    assert not list(run.rglob("*.tmp"))


def test_make_test_set_on_a_full_disk_names_its_file(mnist_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "test.npy"
    monkeypatch.setattr(np, "save", full_disk)
    refused(capsys, mm.main, ["make-test-set", "--out", str(out), "--num", "2", "--root", str(mnist_root),
                              "--no-download"], f"can't write {out}", "the disk may be full")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------
# The process count is part of the experiment

@pytest.mark.parametrize("world, words", [
    (2, ["global batch of 2", "keep it with: torchrun --nproc_per_node=2 main.py --resume", "--batch-size 1"]),
    (3, ["3 processes can't share it", "resume with 1: python main.py --resume"]),
])
def test_another_process_count_is_refused_with_a_command_that_keeps_the_global_batch(
        world, words, finished, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(world))  # what torchrun sets; refused before it matters
    before = contents(finished)
    refused(capsys, main.main, ["--resume", str(finished), "--workers", "0"], *words)
    assert contents(finished) == before


# ----------------------------------------------------------------------------------------
# Say what is suspicious

def test_a_diverging_loss_stops_with_the_advice_of_a_nan(mnist_root, tmp_path, monkeypatch, capsys):
    real_step, calls = main.train_step, []

    def blow_up(*args, **kwargs):  # what --lr 10 does
        calls.append(1)
        loss = real_step(*args, **kwargs)
        return loss * 1e5 if len(calls) >= 3 else loss

    monkeypatch.setattr(main, "train_step", blow_up)
    refused(capsys, main.main, small(mnist_root, tmp_path / "run", "--epochs", "3"),
            "training diverged", "at step 3", "nothing was saved", "with a lower --lr")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_nan_scores_are_written_as_null_with_a_warning(finished, tmp_path, capsys):
    checkpoint = load_checkpoint(finished / "checkpoints" / "best.pt")
    for value in checkpoint["model"].values():
        value.fill_(float("nan"))
    torch.save(checkpoint, tmp_path / "nan.pt")
    evaluate.main(["--checkpoint", str(tmp_path / "nan.pt"), "--device", "cpu", "--num", "4",
                   "--json", str(tmp_path / "scores.json")])

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    scores = json.loads((tmp_path / "scores.json").read_text(), parse_constant=strict)
    assert scores["model"]["mse"] is None and scores["copy_last_baseline"]["mse"] > 0
    told = warnings_in(capsys.readouterr().err)
    assert len(told) == 1 and "model.mse" in told[0] and "written as null" in told[0]


@pytest.mark.parametrize("figure, animation, formats", [("fig.jpg", "anim.webp", ("JPEG", "WEBP")),
                                                        ("fig.webp", "anim.png", ("WEBP", "PNG")),
                                                        ("fig.png", "anim.gif", ("PNG", "GIF"))])
def test_pictures_get_the_format_their_name_says(figure, animation, formats, finished, tmp_path):
    evaluate.main(["--checkpoint", str(finished / "checkpoints" / "best.pt"), "--device", "cpu",
                   "--num", "2", "--figure", str(tmp_path / figure), "--gif", str(tmp_path / animation)])
    assert Image.open(tmp_path / figure).format == formats[0]
    with Image.open(tmp_path / animation) as frames:
        assert frames.format == formats[1] and frames.n_frames == 6  # 3 input + 3 predicted


CANT_FIT = [  # (command, arguments, words of the one error line)
    (evaluate.main, ["--num", "1000000000"], "--num 1000000000 sequences of 6 frames of 64x64 px needs about"),
    (mm.main, ["make-test-set", "--num", "1000000000", "--out", "{tmp}/t.npy"],
     "--num 1000000000 sequences of --n-frames 20 at --image-size 64 needs about"),
    (mm.main, ["make-test-set", "--image-size", "4096", "--out", "{tmp}/t.npy"], "lower --num or --image-size"),
    (evaluate.main, ["--figure", "{tmp}/fig.xyz"], "--figure {tmp}/fig.xyz: .xyz is not a picture format"),
    (evaluate.main, ["--gif", "{tmp}/anim.jpg"], "--gif {tmp}/anim.jpg: JPEG can't hold an animation"),
    (main.main, ["--arch", "huge", "--batch-size", "1024", "--epoch-size", "1024"],
     "a training step of --batch-size 1024 on 6 frames of 4096x4096 px needs about"),
]


@pytest.mark.parametrize("command, argv, words", CANT_FIT, ids=[" ".join(a)[:40] for _, a, _ in CANT_FIT])
def test_what_cant_fit_or_be_written_is_refused_up_front(command, argv, words, finished, mnist_root,
                                                         tmp_path, monkeypatch, capsys):
    huge = copy.deepcopy(net_params.PRESETS["tiny"])
    huge.image_size = 4096
    monkeypatch.setitem(net_params.PRESETS, "huge", huge)
    argv = [a.format(tmp=tmp_path) for a in argv]
    if command is evaluate.main:
        argv = ["--checkpoint", str(finished / "checkpoints" / "best.pt"), "--device", "cpu", *argv]
    elif command is main.main:
        argv = small(mnist_root, tmp_path / "run", *argv)
    else:
        argv += ["--root", str(mnist_root), "--no-download"]
    refused(capsys, command, argv, words.format(tmp=tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing made, nothing written


def test_an_epoch_of_a_billion_sequences_takes_no_memory(mnist_root, tmp_path):
    run = tmp_path / "run"
    main.main(small(mnist_root, run, "--epoch-size", "1000000000", *ONE_STEP))
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["position"], state["config"]["epoch_size"]) == (0, 2, 10 ** 9)
