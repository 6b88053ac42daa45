"""Winograd F(4x4, 5x5): exact matrices, equality with F.conv2d, and the cells' switch."""

import dataclasses
import random
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from model import build_model
from net_params import get_preset
from tests.helpers import randomize
import winograd
from ConvRNN import ConvLSTMCell, run_cell
from winograd import (CellConv2d, resolve_conv_algorithm, set_conv_algorithm, winograd_conv2d,
                      winograd_matrices)


@pytest.fixture
def everywhere(monkeypatch):
    """Winograd for every 5x5 convolution, narrow ones too (normally it runs where faster)."""
    monkeypatch.setattr(winograd, "MIN_IN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_OUT_CHANNELS", 1)


def test_matrices_compute_a_correlation_exactly():
    """A^T [(G g) * (B^T d)] == the correlation of d and g, in exact rational arithmetic."""
    AT, G, BT = winograd_matrices()
    r = len(G[0])
    m, a = len(AT), len(BT)
    rng = random.Random(r)
    for _ in range(5):
        d = [Fraction(rng.randint(-9, 9)) for _ in range(a)]
        g = [Fraction(rng.randint(-9, 9)) for _ in range(r)]
        Gg = [sum(G[t][k] * g[k] for k in range(r)) for t in range(a)]
        Bd = [sum(BT[t][j] * d[j] for j in range(a)) for t in range(a)]
        y = [sum(AT[i][t] * Gg[t] * Bd[t] for t in range(a)) for i in range(m)]
        assert y == [sum(d[i + k] * g[k] for k in range(r)) for i in range(m)]


@pytest.mark.parametrize("size", [(8, 8), (13, 10), (1, 5), (4, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_conv2d_in_float64(size, bias):
    """Sizes that 4 does not divide (cropped tiles) and tiny images (mostly padding)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, 5, 5, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if bias else None
    want = F.conv2d(x, w, b, padding=2)
    got = winograd_conv2d(x, w, b)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_equal_conv2d_and_layout_is_kept(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 9, 12, generator=g, dtype=torch.float64).to(memory_format=fmt)
    w = torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    grad_out = torch.randn(2, 6, 9, 12, generator=g, dtype=torch.float64)
    grads = []
    for conv in (lambda *t: F.conv2d(*t, padding=2), winograd_conv2d):
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        y = conv(*leaves)
        y.backward(grad_out)
        grads.append([t.grad for t in leaves])
        if conv is winograd_conv2d:
            assert y.is_contiguous(memory_format=fmt)
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(winograd_conv2d, (x, w))


def test_float32_error_is_small():
    """The model's biggest shape: about 1e-5 of the output's scale (direct: about 5e-7)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 64, 64, generator=g)
    w = torch.randn(256, 64, 5, 5, generator=g) * 0.02
    exact = F.conv2d(x.double(), w.double(), padding=2)
    err = (winograd_conv2d(x, w).double() - exact).abs().max() / exact.abs().max()
    assert err < 1e-4


def test_bad_weights_are_refused():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="use F.conv2d for other kernels"):
        winograd_conv2d(x, torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"\(O, 3, 5, 5\)"):
        winograd_conv2d(x, torch.randn(4, 2, 5, 5))


def test_cell_conv_is_a_conv2d_and_switches_algorithm(monkeypatch, everywhere):
    conv = CellConv2d(32, 8, 5).double()
    plain = torch.nn.Conv2d(32, 8, 5, padding=2)
    assert conv.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 32, 10, 10, dtype=torch.float64)
    direct = conv(x)
    conv.algorithm = "winograd"
    assert conv.winograd_applies(x)
    calls = []
    monkeypatch.setattr(winograd, "_winograd", lambda *a: calls.append(1) or real(*a))
    torch.testing.assert_close(conv(x), direct, rtol=0, atol=1e-11)
    assert calls and "algorithm=winograd" in repr(conv)


real = winograd._winograd


@pytest.mark.parametrize("shape,fast", [
    ((64, 256, 5), True), ((96, 96, 5), True), ((32, 128, 5), False), ((64, 64, 5), False),
    ((128, 512, 3), False),
])
def test_winograd_runs_only_where_it_is_faster(shape, fast):
    conv = CellConv2d(*shape)
    conv.algorithm = "winograd"
    assert conv.winograd_applies(torch.randn(1, shape[0], 8, 8)) == fast


def test_big_products_run_in_chunks_with_the_same_result(monkeypatch):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 6, 9, 8, generator=g, dtype=torch.float64).to(
        memory_format=torch.channels_last)
    w = torch.randn(7, 6, 5, 5, generator=g, dtype=torch.float64)
    whole = winograd_conv2d(x, w)
    sizes = []
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 1)  # every image its own chunk
    monkeypatch.setattr(winograd, "_winograd", lambda x, *a: sizes.append(len(x)) or real(x, *a))
    chunked = winograd_conv2d(x, w)
    assert sizes == [1] * 5
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    assert chunked.is_contiguous(memory_format=torch.channels_last)


def test_a_sequence_transforms_the_weights_once(monkeypatch, everywhere):
    """run_cell reuses a state conv's transformed weights over the steps; the gradients
    equal a per-step transform's, and an optimizer step between sequences is seen."""
    torch.manual_seed(0)
    cell = ConvLSTMCell(32, 32, 5).double()
    set_conv_algorithm(cell, "winograd")
    x = torch.randn(2, 4, 32, 8, 8, dtype=torch.float64)
    counted = []
    real_transform = winograd.transform_weight
    monkeypatch.setattr(winograd, "transform_weight",
                        lambda w: counted.append(tuple(w.shape)) or real_transform(w))
    out, _ = run_cell(cell, x)
    # the input conv once (all frames batched), the state conv once for 3 steps (step 0 has
    # no state)
    assert len(counted) == 2
    out.square().sum().backward()
    with_reuse = [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()
    set_conv_algorithm(cell, "direct")
    run_cell(cell, x)[0].square().sum().backward()
    for a, b in zip(with_reuse, [p.grad for p in cell.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    set_conv_algorithm(cell, "winograd")
    with torch.no_grad():
        cell.hidden_conv.weight.add_(0.1)  # as an optimizer step does
        with winograd.sequence(cell):
            first = cell.hidden_conv(out[:, 0])
            cell.hidden_conv.weight.add_(0.1)
            second = cell.hidden_conv(out[:, 0])
        expect = F.conv2d(out[:, 0], cell.hidden_conv.weight, cell.hidden_conv.bias, padding=2)
    torch.testing.assert_close(second, expect, rtol=0, atol=1e-10)
    assert not torch.equal(first, second)


def test_cell_conv_runs_direct_under_autocast(everywhere):
    """Winograd's transforms would amplify bf16 rounding: autocast keeps the direct path."""
    torch.manual_seed(0)
    conv = CellConv2d(32, 8, 5)
    x = torch.randn(2, 32, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = conv(x)
        conv.algorithm = "winograd"
        assert not conv.winograd_applies(x)
        same = conv(x)
    assert same.dtype == torch.bfloat16
    assert torch.equal(same, direct)


def test_resolve_and_set():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_conv_algorithm("auto", cpu) == "winograd"
    assert resolve_conv_algorithm("auto", cpu, "bf16") == "direct"
    assert resolve_conv_algorithm("auto", cuda) == "direct"
    assert resolve_conv_algorithm("direct", cpu) == "direct"
    assert resolve_conv_algorithm("winograd", cuda) == "winograd"
    with pytest.raises(ValueError, match="fp32/fp64 only"):
        resolve_conv_algorithm("winograd", cpu, "bf16")
    with pytest.raises(ValueError, match="unknown conv algorithm"):
        resolve_conv_algorithm("fft", cpu)
    model = build_model("convlstm")
    # 3 encoder cells with input and state convs, the top forecaster cell with a state conv
    # only, 2 forecaster cells with both: 11 convolutions
    assert set_conv_algorithm(model, "winograd") == 11
    convs = [m for m in model.modules() if isinstance(m, CellConv2d)]
    assert all(m.algorithm == "winograd" for m in convs)
    # all but the bottom encoder cell's 16-channel input convolution are wide enough to gain
    fast = [m for m in convs if m.winograd_applies(torch.empty(1, m.in_channels, 4, 4))]
    assert len(fast) == 10 and all(m.in_channels >= 64 for m in fast)
    with pytest.raises(ValueError, match="'direct' or 'winograd'"):
        set_conv_algorithm(model, "auto")


@pytest.mark.parametrize("cell,kernel,options", [
    ("convlstm", 5, {}), ("convlstm", 5, {"peephole": True}), ("convgru", 5, {}),
    ("trajgru", 5, {"links": 3}),
])
def test_model_outputs_and_gradients_match_direct(cell, kernel, options, everywhere):
    """Whole models (the tiny preset's stages), float64: the algorithm changes only rounding."""
    preset = dataclasses.replace(get_preset("tiny"), cell=cell, cell_kernel=kernel,
                                 cell_options=options)
    torch.manual_seed(0)
    model = randomize(build_model(preset).double())
    x = torch.rand(2, 3, 1, 32, 32, dtype=torch.float64)
    results = []
    for algorithm in ("direct", "winograd"):
        set_conv_algorithm(model, algorithm)
        model.zero_grad()
        y = model(x, frames_output=2)
        (y ** 2).sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-10)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_compiles_with_torch_compile():
    """--compile traces the Winograd path (custom autograd functions, the per-sequence
    weight cache is skipped while compiling) to the same outputs and gradients."""
    torch.manual_seed(0)
    cell = ConvLSTMCell(64, 64, 5)
    set_conv_algorithm(cell, "winograd")
    x = torch.randn(1, 2, 64, 4, 4)
    eager, _ = run_cell(cell, x)
    eager.square().sum().backward()
    want = [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()
    compiled = torch.compile(lambda x: run_cell(cell, x)[0])(x)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, expect in zip([p.grad for p in cell.parameters()], want, strict=True):
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
