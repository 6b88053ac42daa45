"""tools/bench.py and tools/amp_check.py run end to end and count what they claim; the speed
features they measure (channels_last, bf16 autocast) keep the model's results. No timing
is asserted: these must pass on any machine."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import utils
from ConvRNN import ConvGRUCell, ConvLSTMCell, run_cell, stack_time, unbind_time
from helpers import randomize, small_original
from model import build_model
from net_params import get_preset
from tools import bench
from tools.amp_check import amp_loss_check
from tools.bench import count_step_flops
from tools.textbook import build_textbook

REPO = Path(__file__).resolve().parents[1]

JSON_KEYS = {
    "arch", "batch_size", "frames_input", "frames_output", "image_size", "amp", "conv",
    "compile", "channels_last", "device", "torch", "threads", "processor", "seq_per_s",
    "step_ms", "step_ms_all", "first_step_ms", "peak_mem_mb", "peak_mem_exact",
    "gflop_per_step", "executed_gflop_per_step", "achieved_gflops", "roofline_gflops",
    "roofline_conv", "utilization", "reference_seq_per_s", "reference_step_ms",
    "reference_gflop_per_step", "reference_peak_mem_mb", "speedup", "malloc_keeps_freed",
}


def run_tool(tool: str, *flags, cwd=REPO) -> subprocess.CompletedProcess:
    """`python tools/<tool>.py FLAGS` as a user types it."""
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), *flags],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_textbook_does_more_work_than_the_fast_model():
    preset = small_original("convlstm")
    fast = count_step_flops(lambda: build_model(preset), 2, 3, 2, 1, 16)
    textbook = count_step_flops(lambda: build_textbook(preset), 2, 3, 2, 1, 16)
    assert 0 < fast < textbook


def test_meta_flop_count_equals_a_real_step():
    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = build_model(preset)
    x, y = torch.rand(2, 3, 1, 32, 32), torch.rand(2, 2, 1, 32, 32)
    counter = FlopCounterMode(display=False)
    with counter:
        F.mse_loss(model(x, frames_output=2), y).backward()
    assert count_step_flops(lambda: build_model(preset), 2, 3, 2, 1, 32) == \
        counter.get_total_flops()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--channels-last"]], ids=["default", "channels-last"])
def test_bench_runs_end_to_end_and_writes_json(tmp_path, extra):
    out = tmp_path / "bench.json"
    result = run_tool("bench", "--arch", "tiny", "--batch-size", "2", "--frames-input", "2",
                      "--frames-output", "2", "--image-size", "32", "--device", "cpu",
                      "--repeats", "1", "--warmup", "1", "--json", str(out), *extra,
                      cwd=tmp_path)  # any working folder
    assert result.returncode == 0, result.stderr
    row = json.loads(out.read_text())
    assert JSON_KEYS <= row.keys()
    assert row["amp"] == "none"  # --amp auto on the CPU
    assert row["channels_last"] == bool(extra)
    assert row["seq_per_s"] > 0 and row["gflop_per_step"] > 0 and row["roofline_gflops"] > 0
    assert row["speedup"] > 0 and row["reference_seq_per_s"] > 0
    assert row["reference_gflop_per_step"] > row["gflop_per_step"]
    assert "textbook seq/s" in result.stdout and "speedup" in result.stdout  # the table


def bench_rows(tmp_path, *flags) -> list[dict]:
    """One bench run on tiny shapes, several rows, no textbook model."""
    out = tmp_path / "bench.json"
    result = run_tool("bench", *flags, "--batch-size", "1", "--frames-input", "2",
                      "--frames-output", "1", "--image-size", "16", "--device", "cpu",
                      "--repeats", "1", "--warmup", "0", "--no-reference", "--json", str(out))
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())["runs"]


@pytest.mark.slow
def test_bench_rows_per_amp_without_textbook(tmp_path):
    runs = bench_rows(tmp_path, "--arch", "tiny", "--amp", "none,bf16")
    assert [r["amp"] for r in runs] == ["none", "bf16"]
    assert all(r["speedup"] is None and r["reference_seq_per_s"] is None for r in runs)


@pytest.mark.slow
def test_bench_rows_per_conv(tmp_path):
    """Winograd runs fewer multiplies for the same model work: the same gflop_per_step,
    a smaller executed count; direct executes exactly the model's count."""
    direct, winograd = bench_rows(tmp_path, "--arch", "convlstm", "--amp", "none",
                                  "--conv", "direct,winograd")
    assert (direct["conv"], winograd["conv"]) == ("direct", "winograd")
    assert direct["gflop_per_step"] == winograd["gflop_per_step"]
    assert direct["executed_gflop_per_step"] == direct["gflop_per_step"]
    assert 0 < winograd["executed_gflop_per_step"] < winograd["gflop_per_step"]


@pytest.mark.parametrize("flags, message", [
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
    (["--amp", "bf16", "--conv", "winograd", "--device", "cpu"],
     "--conv winograd runs in fp32 only"),
    (["--conv", "fft", "--device", "cpu"], "--conv 'fft'"),
    (["--arch", "convlsmt", "--device", "cpu"], "unknown preset 'convlsmt'"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_settings_stop_with_one_line(capsys, flags, message):
    assert utils.run_cli(bench.main, flags) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_bad_flag_from_the_command_line_is_one_line():
    result = run_tool("bench", "--conv", "auto", "--device", "cpu")
    assert result.returncode == 1
    assert result.stderr.startswith("error: --conv 'auto'") and result.stderr.count("\n") == 1


def test_amp_check_runs_and_bf16_tracks_fp32(mnist_root):
    r = amp_loss_check("tiny", "bf16", steps=3, batch=2, frames_input=2, frames_output=2,
                       image_size=32, device=torch.device("cpu"), data_root=str(mnist_root))
    assert r["data"] == f"MNIST digits from {mnist_root}"
    assert len(r["fp32"]["losses"]) == len(r["bf16"]["losses"]) == 3
    assert r["fp32"]["losses"][0] == pytest.approx(r["bf16"]["losses"][0], rel=0.02)
    assert abs(r["val_mse_fp32_ratio"] - 1) < 0.05


@pytest.mark.slow
def test_amp_check_command_writes_json(tmp_path):
    out = tmp_path / "amp.json"
    result = run_tool("amp_check", "--steps", "2", "--batch-size", "2", "--frames-input", "2",
                      "--frames-output", "2", "--image-size", "32", "--device", "cpu",
                      "--json", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    r = json.loads(out.read_text())
    assert r["data"] == "random block shapes" and len(r["bf16"]["losses"]) == 2
    assert "val_mse_fp32" in result.stdout and "ratio" in result.stdout


@pytest.mark.parametrize("name", ["convlstm", "convgru"])
def test_channels_last_gives_the_same_outputs_and_gradients(name):
    preset = small_original(name)
    torch.manual_seed(0)
    nchw = randomize(build_model(preset).double())
    cl = build_model(preset).double().to(memory_format=torch.channels_last)
    cl.load_state_dict(nchw.state_dict())
    x = torch.rand(2, 3, 1, 16, 16, dtype=torch.float64)
    outs = []
    for model in (nchw, cl):
        out = model(x, frames_output=2)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-12, rtol=0)
    for (n, p), q in zip(nchw.named_parameters(), cl.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=0, msg=n)


@pytest.mark.parametrize("cell_cls", [ConvLSTMCell, ConvGRUCell])
def test_run_cell_keeps_channels_last_forward_and_backward(cell_cls):
    cell = cell_cls(3, 8, 3).to(memory_format=torch.channels_last)
    frames = torch.rand(2 * 4, 3, 6, 6).to(memory_format=torch.channels_last)
    x = frames.unflatten(0, (2, 4)).requires_grad_()  # (B, T, C, H, W), channels_last frames
    out, _ = run_cell(cell, x)
    assert all(out[:, t].stride(1) == 1 for t in range(4)), "outputs left channels_last"
    out.sum().backward()
    assert x.grad[:, 0].stride(1) == 1, "the gradient left channels_last"
    frames_out = stack_time(list(unbind_time(x.detach())))
    assert torch.equal(frames_out, x.detach()) and frames_out.stride() == x.stride()


@pytest.mark.parametrize("cell_cls", [ConvLSTMCell, ConvGRUCell])
def test_state_dtypes_are_stable_under_bf16_autocast(cell_cls):
    cell = cell_cls(3, 32, 3, norm="group")
    x = torch.rand(2, 4, 3, 8, 8)
    dtypes = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = None
        for t in range(x.shape[1]):
            out, state = cell(x[:, t], state)
            parts = state if isinstance(state, tuple) else (state,)
            dtypes.append((out.dtype, *(s.dtype for s in parts)))
        outs, _ = run_cell(cell, x)
    assert len(set(dtypes)) == 1, dtypes
    if cell_cls is ConvLSTMCell:  # H is read only by convs; C accumulates, so stays fp32
        assert dtypes[0] == (torch.bfloat16, torch.bfloat16, torch.float32)
    else:  # the GRU's H accumulates: fp32
        assert dtypes[0] == (torch.float32, torch.float32)
    assert outs.dtype == dtypes[0][0]
