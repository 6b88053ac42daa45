"""The nn.LSTM-like layers ConvLSTM / ConvGRU / TrajGRU: their cells by hand, state, layout,
dropout, registration, strategies, compile, ONNX, the README snippet and tools/bench_layers.py."""

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import ConvRNN
from ConvRNN import (ConvGRU, ConvGRUCell, ConvLSTM, ConvLSTMCell, TrajGRU, TrajGRUCell,
                     run_cell)
from helpers import randomize

REPO = Path(__file__).resolve().parents[1]

# Each kind with options that exercise its whole cell (peepholes, norms, several links).
KINDS = {
    "convlstm": (ConvLSTM, dict(peephole=True, norm="group")),
    "convgru": (ConvGRU, dict(norm="group")),
    "trajgru": (TrajGRU, dict(links=3, flow_channels=6)),
}


def make(kind, in_channels=3, hidden=(8, 6), kernel=(3, 5), num_layers=2, seed=0,
         dtype=torch.float64, **kwargs):
    cls, options = KINDS[kind]
    torch.manual_seed(seed)
    layer = cls(in_channels, list(hidden) if num_layers > 1 else hidden[0], kernel, num_layers,
                **options, **kwargs)
    return randomize(layer.to(dtype), seed=seed, std=0.25)


def seq(B=2, T=5, C=3, H=7, W=9, seed=1, dtype=torch.float64):
    return torch.randn(B, T, C, H, W, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def by_hand(layer, x, states=None):
    """Each layer's cells stepped frame by frame, cell(x_t, state), without run_cell; the
    backward cell on the time-reversed input, its outputs reversed back."""
    D = layer.num_directions
    last = []
    for lay in range(layer.num_layers):
        outputs = []
        for d in range(D):
            cell = layer.cells[lay * D + d]
            frames = x if d == 0 else x.flip(1)
            state = None if states is None else states[lay * D + d]
            ys = []
            for t in range(frames.shape[1]):
                y, state = cell(frames[:, t], state)
                ys.append(y)
            y = torch.stack(ys, dim=1)
            outputs.append(y if d == 0 else y.flip(1))
            last.append(state)
        x = torch.cat(outputs, dim=2)
    return x, last


def flat(state):
    """A layer's state as a flat list of tensors."""
    return [t for s in state for t in (s if isinstance(s, tuple) else (s,))]


def assert_same(a, b, atol=1e-10):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# -----------------------------------------------------------------------------
# equations and behaviour

@pytest.mark.parametrize("input_conv", ["batched", "fused"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_two_layers_equal_their_cells_run_by_hand(kind, bidirectional, input_conv):
    layer = make(kind, bidirectional=bidirectional, input_conv=input_conv)
    x = seq()
    out, state = layer(x)
    ref, ref_state = by_hand(layer, x)
    D = 2 if bidirectional else 1
    assert out.shape == (2, 5, D * 6, 7, 9)
    assert_same(out, ref)
    assert len(state) == 2 * D
    for got, want in zip(flat(state), flat(ref_state)):
        assert_same(got, want)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_backward_half_is_the_reverse_cell_on_the_reversed_input(kind):
    layer = make(kind, num_layers=1, hidden=(5,), bidirectional=True)
    x = seq()
    out, state = layer(x)
    backward = layer.cells[1]
    ys, s = [], None
    for t in reversed(range(x.shape[1])):
        y, s = backward(x[:, t], s)
        ys.append(y)
    reversed_back = torch.stack(ys[::-1], dim=1)
    assert_same(out[:, :, 5:], reversed_back)
    assert_same(flat([state[1]])[0], flat([s])[0])  # the backward state is the one after frame 0
    assert not torch.allclose(out[:, :, :5], reversed_back)  # the halves differ


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_sequence_in_two_chunks_equals_one_call(kind):
    layer = make(kind)
    x = seq(T=6)
    whole, whole_state = layer(x)
    first, state = layer(x[:, :2])
    second, state = layer(x[:, 2:], state)
    assert_same(torch.cat([first, second], dim=1), whole)
    for got, want in zip(flat(state), flat(whole_state)):
        assert_same(got, want)
    fresh, _ = layer(x[:, 2:])  # without the state it is a different sequence
    assert not torch.allclose(fresh, second)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_time_major_equals_the_transposed_input(kind):
    batch_major = make(kind, bidirectional=True)
    time_major = make(kind, bidirectional=True, batch_first=False)
    time_major.load_state_dict(batch_major.state_dict())
    x = seq()
    out, state = batch_major(x)
    out_t, state_t = time_major(x.transpose(0, 1).contiguous())  # (T, B, C, H, W)
    assert out_t.shape == (5, 2, 12, 7, 9)
    assert_same(out_t.transpose(0, 1), out)
    for got, want in zip(flat(state_t), flat(state)):
        assert_same(got, want)


@pytest.mark.parametrize("input_conv", ["batched", "fused"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_non_square_input_and_kernel_keep_the_size(kind, input_conv):
    layer = make(kind, kernel=(3, 5), dtype=torch.float32, input_conv=input_conv)
    out, state = layer(seq(B=1, T=2, H=24, W=40, dtype=torch.float32))
    assert out.shape == (1, 2, 6, 24, 40)
    assert all(t.shape == (1, c, 24, 40) for t, c in zip(flat(state), [8, 8, 6, 6]
                                                          if kind == "convlstm" else [8, 6]))
    convs = [m for m in layer.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.padding == (m.kernel_size[0] // 2, m.kernel_size[1] // 2) for m in convs)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_dropout_acts_between_layers_in_training_only(kind):
    x = seq(dtype=torch.float32)
    two = make(kind, dropout=0.5, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.LSTM warns too: dropout with one layer does nothing
        one = make(kind, num_layers=1, hidden=(6,), dropout=0.5, dtype=torch.float32)
    plain = make(kind, dtype=torch.float32)
    plain.load_state_dict(two.state_dict())

    torch.manual_seed(0)
    train = two.train()(x)[0]
    assert not torch.allclose(train, two.eval()(x)[0])  # a mask between the layers
    assert (train != 0).all()  # but none on the output: its entries are all kept
    assert_same(two.eval()(x)[0], plain.eval()(x)[0], atol=0)
    assert_same(plain.train()(x)[0], plain.eval()(x)[0], atol=0)  # dropout=0: train = eval
    assert_same(one.train()(x)[0], one.eval()(x)[0], atol=0)


def test_dropout_with_one_layer_warns_like_nn_lstm():
    with pytest.warns(UserWarning, match="between layers only"):
        ConvLSTM(1, 4, 3, dropout=0.2)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cells_are_registered_like_nn_lstm(kind):
    cls, options = KINDS[kind]
    cell_cls = cls.cell_class
    layer = cls(3, [4, 5], [3, (3, 5)], 2, bidirectional=True, **options)
    lstm = torch.nn.LSTM(3, 4, 2, bidirectional=True)
    lstm_order = list(dict.fromkeys(name.rsplit("_l", 1)[1] for name, _ in lstm.named_parameters()))
    assert lstm_order == ["0", "0_reverse", "1", "1_reverse"]
    ours = list(dict.fromkeys(int(name.split(".")[1]) for name, _ in layer.named_parameters()))
    assert [f"{k // 2}{'_reverse' if k % 2 else ''}" for k in ours] == lstm_order

    widths = [(3, 4, 3), (3, 4, 3), (8, 5, (3, 5)), (8, 5, (3, 5))]  # layer 2 reads both directions
    for k, (c_in, c_hid, kernel) in enumerate(widths):
        cell = layer.cells[k]
        assert type(cell) is cell_cls
        assert (cell.input_channels, cell.hidden_channels, cell.kernel_size) == (c_in, c_hid, kernel)
        alone = cell_cls(c_in, c_hid, kernel, **options)
        assert [n for n, _ in cell.named_parameters()] == [n for n, _ in alone.named_parameters()]
        assert [p.shape for p in cell.parameters()] == [p.shape for p in alone.parameters()]
    names = [n for n, _ in layer.named_parameters()]
    assert names[0].startswith("cells.0.") and names[-1].startswith("cells.3.")
    assert layer.out_channels == 10
    assert layer.hidden_channels == (4, 5) and layer.kernel_size == (3, (3, 5))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fused_and_batched_agree_with_gradients(kind, channels_last):
    batched = make(kind, bidirectional=True, input_conv="batched")
    fused = make(kind, bidirectional=True, input_conv="fused")
    fused.load_state_dict(batched.state_dict())
    x = seq()
    if channels_last:
        batched.to(memory_format=torch.channels_last)
        fused.to(memory_format=torch.channels_last)
        x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    results = []
    for layer in (batched, fused):
        xg = x.clone().requires_grad_(True)
        out, state = layer(xg)
        loss = out.pow(2).sum() + sum(t.pow(3).sum() for t in flat(state))
        results.append((out, torch.autograd.grad(loss, [xg, *layer.parameters()])))
        if channels_last:  # frames stay channels_last through both strategies
            assert ConvRNN._channels_last(out[:, 0]) and ConvRNN._channels_last(out[:, -1])
    (out_b, grads_b), (out_f, grads_f) = results
    assert_same(out_f, out_b)
    assert len(grads_b) == len(grads_f) > 10
    for g_f, g_b in zip(grads_f, grads_b):
        assert_same(g_f, g_b, atol=1e-9)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fused_and_batched_agree_under_bf16_autocast(kind):
    """The same dtypes at every step either way: memory in fp32, convolutions in bf16."""
    batched = make(kind, dtype=torch.float32, input_conv="batched")
    fused = make(kind, dtype=torch.float32, input_conv="fused")
    fused.load_state_dict(batched.state_dict())
    x = seq(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out_b, state_b), (out_f, state_f) = batched(x), fused(x)
    assert out_f.dtype == out_b.dtype
    assert [t.dtype for t in flat(state_f)] == [t.dtype for t in flat(state_b)]
    # bf16 rounds the sums in another order; TrajGRU's warp amplifies that at a few pixels
    error = (out_f.float() - out_b.float()).abs().mean() / out_b.float().abs().mean()
    assert error < 0.03


def input_conv_batch(layer, x):
    """Batch sizes cells[0].input_conv saw: B*T if the input convolution ran batched."""
    seen = []
    hook = layer.cells[0].input_conv.register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[0]))
    layer(x)
    hook.remove()
    return seen


def test_auto_batches_by_default_and_fuses_up_to_the_threshold(monkeypatch):
    one = ConvLSTM(1, 4, 3)  # the default threshold (0, measured): raw frames run batched too
    assert input_conv_batch(one, torch.randn(2, 3, 1, 6, 6)) == [2 * 3]
    n = 4
    monkeypatch.setattr(ConvRNN, "FUSE_MAX_INPUT_CHANNELS", n)
    B, T = 2, 3
    narrow = ConvLSTM(n, 4, 3, input_conv="auto")
    wide = ConvLSTM(n + 1, 4, 3, input_conv="auto")
    # Fused: only the first step (zero state) convolves x alone; later steps convolve cat(x, h).
    assert input_conv_batch(narrow, torch.randn(B, T, n, 6, 6)) == [B]
    assert input_conv_batch(wide, torch.randn(B, T, n + 1, 6, 6)) == [B * T]
    assert input_conv_batch(ConvLSTM(n, 4, 3, input_conv="batched"),
                            torch.randn(B, T, n, 6, 6)) == [B * T]
    assert input_conv_batch(ConvLSTM(n + 1, 4, 3, input_conv="fused"),
                            torch.randn(B, T, n + 1, 6, 6)) == [B]
    two = ConvLSTM(1, 4 * n, 3, 2)  # layer 2 reads 4n channels: batched
    assert [two.fused(k) for k in range(2)] == [True, False]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_batched_layer_does_the_work_of_its_cells_by_run_cell(kind):
    """The same operations as run_cell over each cell: the layer adds no work of its own."""
    layer = make(kind, dtype=torch.float32, input_conv="batched")
    x = seq(dtype=torch.float32)
    flops = []
    for run in (lambda: layer(x)[0], lambda: by_run_cell(layer, x)):
        counter = FlopCounterMode(display=False)
        with counter:
            run().sum().backward()
        flops.append(counter.get_flop_counts()["Global"])
    assert flops[0] == flops[1] and sum(flops[0].values()) > 0


def by_run_cell(layer, x):
    for cell in layer.cells:
        x, _ = run_cell(cell, x)
    return x


# -----------------------------------------------------------------------------
# arguments

@pytest.mark.parametrize("build, x, message", [
    (lambda: ConvLSTM(3, 4, 3), torch.randn(1, 2, 5, 6, 6),
     r"ConvLSTM expects 3 input channels, x \(B, T, C, H, W\) has 5"),
    (lambda: ConvGRU(3, 4, 3, batch_first=False), torch.randn(2, 1, 1, 6, 6),
     r"ConvGRU expects 3 input channels, x \(T, B, C, H, W\) has 1"),
    (lambda: ConvLSTM(3, 4, 3), torch.randn(2, 3, 6, 6), r"expects x of shape \(B, T, C, H, W\)"),
    (lambda: ConvLSTM(3, 4, 3), torch.randn(1, 0, 3, 6, 6), r"non-empty x"),
])
def test_bad_inputs_say_what_was_expected(build, x, message):
    with pytest.raises(ValueError, match=message):
        build()(x)


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_channels=[4, 4, 4], num_layers=2), r"hidden_channels takes one int or one per layer \(num_layers=2\)"),
    (dict(hidden_channels=0), r"hidden_channels must be ints >= 1"),
    (dict(kernel_size=4), r"kernel_size takes an odd int or an odd \(kh, kw\) tuple"),
    (dict(kernel_size=(3, 4)), r"kernel_size takes an odd int"),
    (dict(kernel_size=[3, 5, 3], num_layers=2), r"one kernel per layer \(num_layers=2\), got 3"),
    (dict(num_layers=0), r"num_layers must be an int >= 1"),
    (dict(in_channels=0), r"in_channels must be an int >= 1"),
    (dict(dropout=1.5, num_layers=2), r"dropout must be a probability"),
    (dict(input_conv="split"), r"input_conv must be one of auto, batched, fused"),
])
def test_bad_arguments_are_clear_value_errors(kwargs, message):
    args = dict(in_channels=2, hidden_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ConvLSTM(**args)


def test_bad_states_are_named():
    layer = ConvLSTM(2, [4, 5], 3, 2)
    x = torch.randn(1, 2, 2, 6, 6)
    _, state = layer(x)
    with pytest.raises(ValueError, match=r"list of 2 cell states .* got 1 entries"):
        layer(x, state[:1])
    with pytest.raises(ValueError, match=r"state\[1\] \(layer 1, forward\) should be a \(h, c\) "
                                         r"pair, each \(1, 5, 6, 6\)"):
        layer(x, [state[0], state[0]])
    with pytest.raises(ValueError, match=r"state\[0\] .* should be a tensor h"):
        ConvGRU(2, 4, 3)(x, [(x, x)])
    out, _ = layer(x, [None, state[1]])  # a None entry is a zero state
    assert out.shape == (1, 2, 5, 6, 6)


def test_cells_take_odd_kernel_pairs():
    cell = ConvLSTMCell(2, 4, (3, 5))
    assert cell.kernel_size == (3, 5) and cell.hidden_conv.padding == (1, 2)
    assert ConvLSTMCell(2, 4, 3).kernel_size == 3  # an int stays an int
    gru = ConvGRUCell(2, 4, (5, 1))
    assert gru.gate_conv.padding == (2, 0) and gru.input_conv.padding == (2, 0)
    traj = TrajGRUCell(2, 4, (3, 5), links=2, input_kernel_size=(1, 3))
    assert traj.flow_hidden_conv.padding == (1, 2) and traj.input_conv.padding == (0, 1)
    out, _ = cell(torch.randn(1, 2, 6, 10), None)
    assert out.shape == (1, 4, 6, 10)
    for bad in [(3, 4), (3,), (3, 3, 3), "3", 0]:
        with pytest.raises(ValueError, match="odd"):
            ConvLSTMCell(2, 4, bad)


# -----------------------------------------------------------------------------
# compile and export

def compiled_equals_eager(layer, x, **compile_options):
    torch._dynamo.reset()
    with torch.no_grad():  # an inference graph: compiling the backward too would triple the time
        out, state = layer(x)
        compiled_out, compiled_state = torch.compile(layer, fullgraph=True, **compile_options)(x)
    torch.testing.assert_close(compiled_out, out, atol=1e-5, rtol=1e-5)
    for got, want in zip(flat(compiled_state), flat(state)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_torch_compile_traces_each_kind_in_one_graph(kind):
    """fullgraph: no graph breaks, both strategies (auto: layer 1 fused, layer 2 batched) and
    both directions. aot_eager traces as the default backend does, without its C++ build."""
    layer = make(kind, dtype=torch.float32, bidirectional=True, in_channels=1).eval()
    compiled_equals_eager(layer, seq(C=1, T=3, dtype=torch.float32), backend="aot_eager")


@pytest.mark.slow
def test_torch_compile_default_backend_gives_the_same_output():
    layer = make("convlstm", dtype=torch.float32, bidirectional=True, in_channels=1).eval()
    compiled_equals_eager(layer, seq(C=1, T=3, dtype=torch.float32))


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_onnx_export_runs_in_onnxruntime(kind, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime cannot be imported here")
    pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript")
    layer = make(kind, dtype=torch.float32, bidirectional=True, in_channels=1).eval()
    x = seq(C=1, T=4, dtype=torch.float32)
    out, state = layer(x)
    path = tmp_path / "layer.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (x,), dynamo=True).save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    want = [out, *flat(state)]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        assert abs(g - w.detach().numpy()).max() < 1e-4


# -----------------------------------------------------------------------------
# docs and tools

def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Use the layers in your own model", 1)[1].split("\n## ", 1)[0]
    # ```py, not ```python: test_model.py runs the README's first ```python block (a preset)
    blocks = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section should hold one python snippet"
    return blocks[0]


def test_readme_snippet_runs():
    snippet = readme_snippet()
    assert "from ConvRNN import" in snippet and len(snippet.splitlines()) <= 20
    result = subprocess.run([sys.executable, "-c", snippet], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([4, 1, 64, 64])" in result.stdout


TINY = ["--in-channels", "1,8", "--num-layers", "1,2", "--kernels", "3", "--hidden", "4",
        "--batch-size", "1", "--frames", "2", "--size", "8", "--warmup", "0", "--repeats", "1",
        "--device", "cpu"]


def test_bench_layers_prints_every_shape_and_variant(tmp_path, capsys):
    from tools import bench_layers
    rows = bench_layers.main(TINY + ["--json", str(tmp_path / "rows.json")])
    out = capsys.readouterr().out
    assert "torch CPU capability" in out and "oneDNN bf16" in out
    shapes = {(r["in_channels"], r["num_layers"], r["layout"], r["amp"]) for r in rows}
    amps = ["none"] + (["bf16"] if bench_layers.native_bf16(torch.device("cpu")) else [])
    assert shapes == {(c, n, lay, a) for c in (1, 8) for n in (1, 2)
                      for lay in ("nchw", "channels_last") for a in amps}
    for row in rows:
        assert all(row[f"{v}_ms"] > 0 for v in bench_layers.VARIANTS)
        assert row["run_cell_over_batched"] == row["run_cell_ms"] / row["batched_ms"]
        assert row["auto_choice"] in ("fused", "batched", "fused,fused", "fused,batched",
                                      "batched,fused", "batched,batched")
    table = out[out.index("\ncell ") + 1:]
    for header in ("auto ms", "batched ms", "fused ms", "run_cell ms", "textbook ms",
                   "run_cell/batched", "textbook/auto", "batched/fused"):
        assert header in table
    assert len(table.strip().splitlines()) == 2 + len(rows)
    assert '"runs"' in (tmp_path / "rows.json").read_text()


def test_bench_layers_refuses_bad_flags():
    from tools import bench_layers
    from utils import UsageError
    with pytest.raises(UsageError, match="--kernels 4: cell kernels must be odd"):
        bench_layers.main(["--kernels", "4"])
    with pytest.raises(UsageError, match="--layout"):
        bench_layers.main(["--layout", "nhwc"])


@pytest.mark.slow
def test_bench_py_layers_flag_runs_bench_layers():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--layers",
                             "--cell", "convgru", *TINY, "--in-channels", "1", "--num-layers",
                             "1", "--layout", "nchw", "--amp", "none"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "convgru" in result.stdout and "textbook/auto" in result.stdout
