"""tools/convert_original.py: a checkpoint of the original repo, converted, computes what the
original model computed; anything that doesn't fit stops with one line.

The original model is tests/original_model.py, transcribed from the original's documented
architecture. ORIGINAL_STATE_DICT lists the keys and shapes of the original's checkpoints,
as its own two models give them, without the "module." of nn.DataParallel.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ConvRNN import ConvGRUCell
from checkpoints import load_checkpoint
from model import build_model
from original_model import CGRU_cell, ED
from tools import convert_original
from utils import run_cli
from helpers import randomize

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "convert_original.py"

ORIGINAL_STATE_DICT = {  # key shape, in the original's order (its state_dict() without module.)
    "convlstm": """
encoder.stage1.conv1_leaky_1.weight (16, 1, 3, 3)
encoder.stage1.conv1_leaky_1.bias (16,)
encoder.rnn1.conv.0.weight (256, 80, 5, 5)
encoder.rnn1.conv.0.bias (256,)
encoder.rnn1.conv.1.weight (256,)
encoder.rnn1.conv.1.bias (256,)
encoder.stage2.conv2_leaky_1.weight (64, 64, 3, 3)
encoder.stage2.conv2_leaky_1.bias (64,)
encoder.rnn2.conv.0.weight (384, 160, 5, 5)
encoder.rnn2.conv.0.bias (384,)
encoder.rnn2.conv.1.weight (384,)
encoder.rnn2.conv.1.bias (384,)
encoder.stage3.conv3_leaky_1.weight (96, 96, 3, 3)
encoder.stage3.conv3_leaky_1.bias (96,)
encoder.rnn3.conv.0.weight (384, 192, 5, 5)
encoder.rnn3.conv.0.bias (384,)
encoder.rnn3.conv.1.weight (384,)
encoder.rnn3.conv.1.bias (384,)
decoder.rnn3.conv.0.weight (384, 192, 5, 5)
decoder.rnn3.conv.0.bias (384,)
decoder.rnn3.conv.1.weight (384,)
decoder.rnn3.conv.1.bias (384,)
decoder.stage3.deconv1_leaky_1.weight (96, 96, 4, 4)
decoder.stage3.deconv1_leaky_1.bias (96,)
decoder.rnn2.conv.0.weight (384, 192, 5, 5)
decoder.rnn2.conv.0.bias (384,)
decoder.rnn2.conv.1.weight (384,)
decoder.rnn2.conv.1.bias (384,)
decoder.stage2.deconv2_leaky_1.weight (96, 96, 4, 4)
decoder.stage2.deconv2_leaky_1.bias (96,)
decoder.rnn1.conv.0.weight (256, 160, 5, 5)
decoder.rnn1.conv.0.bias (256,)
decoder.rnn1.conv.1.weight (256,)
decoder.rnn1.conv.1.bias (256,)
decoder.stage1.conv3_leaky_1.weight (16, 64, 3, 3)
decoder.stage1.conv3_leaky_1.bias (16,)
decoder.stage1.conv4_leaky_1.weight (1, 16, 1, 1)
decoder.stage1.conv4_leaky_1.bias (1,)
""",
    "convgru": """
encoder.stage1.conv1_leaky_1.weight (16, 1, 3, 3)
encoder.stage1.conv1_leaky_1.bias (16,)
encoder.rnn1.conv1.0.weight (128, 80, 5, 5)
encoder.rnn1.conv1.0.bias (128,)
encoder.rnn1.conv1.1.weight (128,)
encoder.rnn1.conv1.1.bias (128,)
encoder.rnn1.conv2.0.weight (64, 80, 5, 5)
encoder.rnn1.conv2.0.bias (64,)
encoder.rnn1.conv2.1.weight (64,)
encoder.rnn1.conv2.1.bias (64,)
encoder.stage2.conv2_leaky_1.weight (64, 64, 3, 3)
encoder.stage2.conv2_leaky_1.bias (64,)
encoder.rnn2.conv1.0.weight (192, 160, 5, 5)
encoder.rnn2.conv1.0.bias (192,)
encoder.rnn2.conv1.1.weight (192,)
encoder.rnn2.conv1.1.bias (192,)
encoder.rnn2.conv2.0.weight (96, 160, 5, 5)
encoder.rnn2.conv2.0.bias (96,)
encoder.rnn2.conv2.1.weight (96,)
encoder.rnn2.conv2.1.bias (96,)
encoder.stage3.conv3_leaky_1.weight (96, 96, 3, 3)
encoder.stage3.conv3_leaky_1.bias (96,)
encoder.rnn3.conv1.0.weight (192, 192, 5, 5)
encoder.rnn3.conv1.0.bias (192,)
encoder.rnn3.conv1.1.weight (192,)
encoder.rnn3.conv1.1.bias (192,)
encoder.rnn3.conv2.0.weight (96, 192, 5, 5)
encoder.rnn3.conv2.0.bias (96,)
encoder.rnn3.conv2.1.weight (96,)
encoder.rnn3.conv2.1.bias (96,)
decoder.rnn3.conv1.0.weight (192, 192, 5, 5)
decoder.rnn3.conv1.0.bias (192,)
decoder.rnn3.conv1.1.weight (192,)
decoder.rnn3.conv1.1.bias (192,)
decoder.rnn3.conv2.0.weight (96, 192, 5, 5)
decoder.rnn3.conv2.0.bias (96,)
decoder.rnn3.conv2.1.weight (96,)
decoder.rnn3.conv2.1.bias (96,)
decoder.stage3.deconv1_leaky_1.weight (96, 96, 4, 4)
decoder.stage3.deconv1_leaky_1.bias (96,)
decoder.rnn2.conv1.0.weight (192, 192, 5, 5)
decoder.rnn2.conv1.0.bias (192,)
decoder.rnn2.conv1.1.weight (192,)
decoder.rnn2.conv1.1.bias (192,)
decoder.rnn2.conv2.0.weight (96, 192, 5, 5)
decoder.rnn2.conv2.0.bias (96,)
decoder.rnn2.conv2.1.weight (96,)
decoder.rnn2.conv2.1.bias (96,)
decoder.stage2.deconv2_leaky_1.weight (96, 96, 4, 4)
decoder.stage2.deconv2_leaky_1.bias (96,)
decoder.rnn1.conv1.0.weight (128, 160, 5, 5)
decoder.rnn1.conv1.0.bias (128,)
decoder.rnn1.conv1.1.weight (128,)
decoder.rnn1.conv1.1.bias (128,)
decoder.rnn1.conv2.0.weight (64, 160, 5, 5)
decoder.rnn1.conv2.0.bias (64,)
decoder.rnn1.conv2.1.weight (64,)
decoder.rnn1.conv2.1.bias (64,)
decoder.stage1.conv3_leaky_1.weight (16, 64, 3, 3)
decoder.stage1.conv3_leaky_1.bias (16,)
decoder.stage1.conv4_leaky_1.weight (1, 16, 1, 1)
decoder.stage1.conv4_leaky_1.bias (1,)
""",
}


def original_shapes(arch: str) -> list[tuple[str, tuple]]:
    rows = (line.split(" ", 1) for line in ORIGINAL_STATE_DICT[arch].strip().splitlines())
    return [(key, ast.literal_eval(shape)) for key, shape in rows]


def save_original(path, model, prefix="", epoch=7):
    """In the original's file format: torch.save of {'epoch', 'state_dict', 'optimizer'}."""
    state = {prefix + key: t for key, t in model.state_dict().items()}
    torch.save({"epoch": epoch, "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}},
               path)
    return path


def convert(tmp_path, source, arch, *extra):
    out = tmp_path / "converted.pt"
    convert_original.main([str(source), "--arch", arch, "--out", str(out), *extra])
    return load_checkpoint(out)


@pytest.mark.parametrize("arch, count", [("convlstm", 9_032_225), ("convgru", 6_880_289)])
def test_transcription_has_the_original_keys_and_shapes(arch, count):
    state = ED(arch).state_dict()
    assert [(k, tuple(t.shape)) for k, t in state.items()] == original_shapes(arch)
    assert sum(t.numel() for t in state.values()) == count


@pytest.mark.slow  # two full-size models in float64
@pytest.mark.parametrize("arch, prefix", [("convlstm", ""), ("convgru", "module.")])
def test_converted_checkpoint_computes_what_the_original_did(tmp_path, arch, prefix):
    torch.manual_seed(0)
    original = randomize(ED(arch).double(), std=0.2)
    checkpoint = convert(tmp_path, save_original(tmp_path / "checkpoint_7_0.001.pth.tar",
                                                 original, prefix), arch)
    config = checkpoint["config"]
    assert config["arch"] == arch and config["num_digits"] == [3]
    assert {"frames_input", "frames_output", "data_root", "seed"} <= set(config)
    assert checkpoint["epoch"] == 7
    assert checkpoint["converted_from"] == str(tmp_path / "checkpoint_7_0.001.pth.tar")
    model = build_model(config["model"]).double()
    model.load_state_dict(checkpoint["model"])
    # Fully convolutional: 16x16 frames pass the two stride-2 stages like 64x64 ones.
    x = torch.rand(2, 3, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = original(x, 2)
        assert (expected < 0).any(), "the test needs outputs the LeakyReLU head bends"
        torch.testing.assert_close(model(x, frames_output=2), expected, atol=1e-10, rtol=0)


def test_convgru_conversion_negates_the_z_half_of_the_gate_norm(tmp_path):
    torch.manual_seed(0)
    original = randomize(ED("convgru"))
    checkpoint = convert(tmp_path, save_original(tmp_path / "original.pth.tar", original),
                         "convgru", "--num-digits", "2", "3")
    assert checkpoint["config"]["num_digits"] == [2, 3]
    theirs, ours = original.state_dict(), checkpoint["model"]
    for name in ("weight", "bias"):  # encoder rnn1: hidden 64, so z is rows :64
        gate_norm = ours[f"encoder.stages.0.cell.gate_norm.{name}"]
        torch.testing.assert_close(gate_norm[:64], -theirs[f"encoder.rnn1.conv1.1.{name}"][:64])
        torch.testing.assert_close(gate_norm[64:], theirs[f"encoder.rnn1.conv1.1.{name}"][64:])
    # The top forecaster cell keeps only the state columns of the original's rnn3.
    torch.testing.assert_close(ours["forecaster.stages.0.cell.gate_conv.weight"],
                               theirs["decoder.rnn3.conv1.0.weight"][:, 96:])


def test_update_gate_flips_through_the_convs_without_a_norm():
    # The presets always have a GroupNorm on z; without one the z rows themselves flip.
    torch.manual_seed(0)
    theirs = randomize(CGRU_cell(3, 8, norm=False).double())
    ours = ConvGRUCell(3, 8, 5, norm=None).double()
    ours.load_state_dict(convert_original.convert_cell(theirs.state_dict(), ours, "convgru"))
    x, h = (torch.randn(2, n, 6, 5, dtype=torch.float64) for n in (3, 8))
    torch.testing.assert_close(ours(x, h)[0], theirs(x, h)[0], atol=1e-12, rtol=0)


@pytest.mark.slow  # a subprocess
def test_cli_runs_from_any_directory(tmp_path):
    source = save_original(tmp_path / "original.pth.tar", ED("convgru"), prefix="module.")
    out = tmp_path / "sub" / "converted.pt"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([sys.executable, str(SCRIPT), str(source), "--arch", "convgru",
                          "--out", str(out), "--num-digits", "2", "3"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    checkpoint = load_checkpoint(out)
    assert checkpoint["config"]["num_digits"] == [2, 3]
    build_model(checkpoint["config"]["model"]).load_state_dict(checkpoint["model"])


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """The original's two models, saved, and their state_dicts (float32, default init)."""
    folder = tmp_path_factory.mktemp("originals")
    torch.manual_seed(0)
    return {arch: (save_original(folder / f"{arch}.pth.tar", model), model.state_dict())
            for arch, model in (("convlstm", ED("convlstm")), ("convgru", ED("convgru")))}


def edited_state(originals, tmp_path, edit):
    state = dict(originals["convlstm"][1])
    edit(state)
    torch.save({"epoch": 1, "state_dict": state}, tmp_path / "edited.pth.tar")
    return tmp_path / "edited.pth.tar"


BAD_INPUTS = {
    "missing file": (lambda o, tmp: tmp / "nowhere.pth.tar", "convlstm", "no such file"),
    "text file": (lambda o, tmp: tmp / "notes.txt", "convlstm", "torch.load failed"),
    "no state_dict": (lambda o, tmp: tmp / "weights.pt", "convlstm", "a 'state_dict' dict"),
    "this repo's checkpoint": (lambda o, tmp: tmp / "ours.pt", "convlstm",
                               "already a checkpoint of this repo"),
    "convlstm file as convgru": (lambda o, tmp: o["convlstm"][0], "convgru",
                                 "holds the original's convlstm model, not convgru; "
                                 "run again with --arch convlstm"),
    "convgru file as convlstm": (lambda o, tmp: o["convgru"][0], "convlstm",
                                 "--arch convgru"),
    "missing key": (lambda o, tmp: edited_state(o, tmp,
                                                lambda s: s.pop("decoder.rnn1.conv.1.bias")),
                    "convlstm", "lacks 'decoder.rnn1.conv.1.bias' of the original's convlstm"),
    "unexpected key": (lambda o, tmp: edited_state(o, tmp,
                                                   lambda s: s.update(extra=torch.zeros(1))),
                       "convlstm", "unexpected key 'extra'"),
    "wrong shape": (lambda o, tmp: edited_state(
        o, tmp, lambda s: s.update({"encoder.rnn2.conv.0.weight": torch.zeros(384, 150, 5, 5)})),
        "convlstm", "encoder.rnn2.conv.0.weight has shape (384, 150, 5, 5) but the original's "
                    "convlstm has (384, 160, 5, 5)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_stop_with_one_line_and_write_nothing(originals, tmp_path, capsys, case):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "weights.pt")
    torch.save({"model": {}, "config": {}}, tmp_path / "ours.pt")
    make_source, arch, message = BAD_INPUTS[case]
    source = make_source(originals, tmp_path)
    before = set(tmp_path.iterdir())
    out = tmp_path / "converted.pt"
    assert run_cli(convert_original.main, [str(source), "--arch", arch, "--out", str(out)]) == 1
    assert_one_error_line(capsys, message)
    assert set(tmp_path.iterdir()) == before


@pytest.mark.parametrize("args, message", [
    (["--out", "{tmp}"], "is a directory"),
    (["--out", "{tmp}/taken.pt"], "exists; remove it or choose another name"),
    (["--out", "{tmp}/new.pt", "--num-digits", "0"], "--num-digits takes counts >= 1"),
    (["--out", "{tmp}/new.pt", "--arch", "trajgru"], "invalid choice: 'trajgru'"),
])
def test_bad_flags_stop_with_one_line_and_write_nothing(originals, tmp_path, capsys, args, message):
    (tmp_path / "taken.pt").write_text("a file we must not overwrite")
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    argv = [str(originals["convlstm"][0]), "--arch", "convlstm",
            *(a.format(tmp=tmp_path) for a in args)]
    assert run_cli(convert_original.main, argv) == 1
    assert_one_error_line(capsys, message)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def assert_one_error_line(capsys, message):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
