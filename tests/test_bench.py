"""bench.py and reference.py: the textbook baseline computes what the fast model computes,
and the benchmark runs end to end. No timing is asserted: these must pass on any machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import count_step_flops
from ConvRNN import ConvGRUCell, ConvLSTMCell, run_cell, stack_time, unbind_time
from model import build_model, count_parameters
from net_params import Conv, Preset, Stage, get_preset
from reference import build_reference, load_fast_weights
from helpers import randomize

REPO = Path(__file__).resolve().parents[1]

JSON_KEYS = {
    "seq_per_s", "step_ms", "peak_mem_mb", "gflop_per_step", "achieved_gflops",
    "roofline_gflops", "utilization", "reference_seq_per_s", "speedup",
    "arch", "batch_size", "amp", "compile", "device", "torch", "threads",
    "conv", "executed_gflop_per_step",
}



def small_original(cell: str, **options) -> Preset:
    """The original's stage layout (stride 1, 2, 2; transposed ups) at a fraction of the width."""
    return Preset(
        cell=cell,
        stages=[Stage(down=Conv(1, 4, 3), hidden=8, up=Conv(8, 4, 3)),
                Stage(down=Conv(8, 8, 3, stride=2), hidden=12,
                      up=Conv(12, 12, 4, stride=2, transposed=True)),
                Stage(down=Conv(12, 12, 3, stride=2), hidden=12,
                      up=Conv(12, 12, 4, stride=2, transposed=True))],
        head=[Conv(4, 1, 1)], cell_kernel=3, norm="group", cell_options=options,
        image_size=16)


@pytest.mark.parametrize("preset", [
    small_original("convlstm"),
    small_original("convlstm", peephole=True),
    small_original("convgru"),
], ids=["convlstm", "convlstm-peephole", "convgru"])
def test_reference_and_fast_model_agree_on_outputs_and_gradients(preset):
    torch.manual_seed(0)
    fast = randomize(build_model(preset).double())
    ref = build_reference(preset).double()
    load_fast_weights(ref, fast)
    x = torch.rand(2, 3, 1, 16, 16, dtype=torch.float64)
    target = torch.rand(2, 2, 1, 16, 16, dtype=torch.float64)

    out_fast, out_ref = fast(x, frames_output=2), ref(x, frames_output=2)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-10, rtol=0)

    F.mse_loss(out_fast, target).backward()
    F.mse_loss(out_ref, target).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        if name.endswith(("input_conv.weight", "hidden_conv.weight", "hidden_conv.bias",
                          "gate_conv.weight", "gate_conv.bias", "candidate_conv.weight",
                          "candidate_conv.bias")):
            continue  # checked below through the cat(x, h) convolutions
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-10, rtol=0, msg=name)

    ref_cells = [s.cell for s in ref.encoder.stages] + [s.cell for s in ref.forecaster.stages]
    fast_cells = [s.cell for s in fast.encoder.stages] + [s.cell for s in fast.forecaster.stages]
    for k, (rc, fc) in enumerate(zip(ref_cells, fast_cells)):
        if preset.cell == "convlstm":
            pairs = [(rc.conv, fc.hidden_conv, slice(None))]
        else:
            C = fc.hidden_channels
            pairs = [(rc.gate_conv, fc.gate_conv, slice(0, 2 * C)),
                     (rc.candidate_conv, fc.candidate_conv, slice(2 * C, 3 * C))]
        for ref_conv, hidden_conv, rows in pairs:
            C_in = ref_conv.in_channels - hidden_conv.in_channels
            torch.testing.assert_close(ref_conv.weight.grad[:, C_in:], hidden_conv.weight.grad,
                                       atol=1e-10, rtol=0, msg=f"cell {k} state weights")
            torch.testing.assert_close(ref_conv.bias.grad, hidden_conv.bias.grad,
                                       atol=1e-10, rtol=0, msg=f"cell {k} bias")
            if fc.input_conv is not None:
                torch.testing.assert_close(ref_conv.weight.grad[:, :C_in],
                                           fc.input_conv.weight.grad[rows],
                                           atol=1e-10, rtol=0, msg=f"cell {k} input weights")


@pytest.mark.parametrize("name, original", [("convlstm", 9_032_225), ("convgru", 6_880_289)])
def test_reference_has_the_original_repos_parameter_count(name, original):
    # The reference keeps the forecaster top cell's input weights, which only see zeros.
    assert count_parameters(build_reference(get_preset(name))) == original


def test_reference_does_more_work_than_the_fast_model():
    preset = small_original("convlstm")
    fast = count_step_flops(lambda: build_model(preset), 2, 3, 2, 1, 16)
    ref = count_step_flops(lambda: build_reference(preset), 2, 3, 2, 1, 16)
    assert 0 < fast < ref


def test_meta_flop_count_equals_a_real_step():
    from torch.utils.flop_counter import FlopCounterMode
    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = build_model(preset)
    x, y = torch.rand(2, 3, 1, 32, 32), torch.rand(2, 2, 1, 32, 32)
    counter = FlopCounterMode(display=False)
    with counter:
        F.mse_loss(model(x, frames_output=2), y).backward()
    assert count_step_flops(lambda: build_model(preset), 2, 3, 2, 1, 32) == \
        counter.get_total_flops()


@pytest.mark.parametrize("extra", [[], ["--channels-last"]], ids=["default", "channels-last"])
def test_bench_runs_end_to_end_and_writes_json(tmp_path, extra):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench.py", "--arch", "tiny", "--batch-size", "2",
           "--frames-input", "2", "--frames-output", "2", "--image-size", "32",
           "--device", "cpu", "--repeats", "1", "--warmup", "1", "--json", str(out), *extra]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    row = json.loads(out.read_text())
    assert JSON_KEYS <= row.keys()
    assert row["seq_per_s"] > 0 and row["gflop_per_step"] > 0 and row["roofline_gflops"] > 0
    assert row["speedup"] > 0 and row["reference_seq_per_s"] > 0
    assert row["utilization"] == pytest.approx(row["achieved_gflops"] / row["roofline_gflops"])
    assert "speedup" in result.stdout  # the table


def bench_rows(tmp_path, *flags) -> list[dict]:
    """One bench.py run on tiny shapes, several rows, no reference."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench.py", *flags,
           "--batch-size", "1", "--frames-input", "2", "--frames-output", "1",
           "--image-size", "16", "--device", "cpu", "--repeats", "1", "--warmup", "0",
           "--no-reference", "--json", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())["runs"]


def test_bench_several_rows_and_no_reference(tmp_path):
    runs = bench_rows(tmp_path, "--arch", "tiny", "--amp", "none,bf16")
    assert [r["amp"] for r in runs] == ["none", "bf16"]
    assert all(r["speedup"] is None for r in runs)


def test_bench_rows_per_conv_algorithm(tmp_path):
    """Winograd runs fewer multiplies for the same model work: the same gflop_per_step,
    a smaller executed count; direct executes exactly the model's count."""
    direct, winograd = bench_rows(tmp_path, "--arch", "convlstm", "--conv", "direct,winograd")
    assert (direct["conv"], winograd["conv"]) == ("direct", "winograd")
    assert direct["gflop_per_step"] == winograd["gflop_per_step"]
    assert direct["executed_gflop_per_step"] == direct["gflop_per_step"]
    assert 0 < winograd["executed_gflop_per_step"] < winograd["gflop_per_step"]


def test_bench_compares_one_and_two_ddp_processes(tmp_path):
    out = tmp_path / "ddp.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "bench.py", "--arch", "tiny", "--nproc", "2", "--batch-size", "2",
           "--frames-input", "2", "--frames-output", "2", "--image-size", "16",
           "--device", "cpu", "--repeats", "1", "--warmup", "1", "--json", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["ddp"]
    assert [r["processes"] for r in rows] == [1, 2]
    assert [r["global_batch"] for r in rows] == [2, 4]  # --batch-size is per process
    assert all(r["seq_per_s"] > 0 for r in rows) and rows[0]["speedup_vs_1"] == 1
    assert "vs 1 process" in result.stdout


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
        outs, state = None, None
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


def test_loss_check_runs_and_bf16_tracks_fp32():
    from bench import amp_loss_check
    r = amp_loss_check("tiny", "bf16", steps=3, batch=2, frames_input=2, frames_output=2,
                       image_size=32, device=torch.device("cpu"))
    assert len(r["fp32"]["losses"]) == len(r["bf16"]["losses"]) == 3
    assert abs(r["val_mse_fp32_ratio"] - 1) < 0.05


def test_bad_settings_stop_with_one_line():
    from bench import main
    with pytest.raises(SystemExit, match="fp16 needs a CUDA device"):
        main(["--amp", "fp16", "--device", "cpu"])
    with pytest.raises(SystemExit, match="Winograd convolution runs in fp32/fp64 only"):
        main(["--amp", "bf16", "--conv", "winograd", "--device", "cpu"])
    with pytest.raises(SystemExit, match="unknown preset 'convlsmt'"):
        main(["--arch", "convlsmt", "--device", "cpu"])
