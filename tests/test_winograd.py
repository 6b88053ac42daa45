"""tools/winograd.py: exact matrices, equality with F.conv2d, and use_winograd on models."""

import dataclasses
import random
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ConvRNN import ConvLSTMCell, run_cell
from helpers import randomize
from model import build_model
from net_params import get_preset
from tools import winograd
from tools.winograd import WinogradConv2d, use_winograd, winograd_conv2d, winograd_matrices

real_winograd = winograd._winograd
real_transform = winograd.transform_weight


@pytest.fixture
def everywhere(monkeypatch):
    """Winograd for every 5x5 convolution, narrow ones too (normally it runs where faster)."""
    monkeypatch.setattr(winograd, "MIN_IN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_OUT_CHANNELS", 1)


@pytest.fixture
def transforms(monkeypatch):
    """The shapes of the weights transform_weight is called on, in call order."""
    calls = []
    monkeypatch.setattr(winograd, "transform_weight",
                        lambda w: calls.append(tuple(w.shape)) or real_transform(w))
    return calls


def tiny_5x5(cell="convlstm", **options):
    """The tiny preset's stages with 5x5 cells: 7 cell convolutions (with `everywhere`)."""
    return dataclasses.replace(get_preset("tiny"), cell=cell, cell_kernel=5, cell_options=options)


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
    """convlstm's widest shape: about 1e-5 of the output's scale (direct: about 5e-7)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, 32, 32, generator=g)
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


def test_big_products_run_in_chunks_with_the_same_result(monkeypatch):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 6, 9, 8, generator=g, dtype=torch.float64).to(
        memory_format=torch.channels_last)
    w = torch.randn(7, 6, 5, 5, generator=g, dtype=torch.float64)
    whole = winograd_conv2d(x, w)
    sizes = []
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 1)  # every image its own chunk
    monkeypatch.setattr(winograd, "_winograd",
                        lambda x, *a: sizes.append(len(x)) or real_winograd(x, *a))
    chunked = winograd_conv2d(x, w)
    assert sizes == [1] * 5
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    assert chunked.is_contiguous(memory_format=torch.channels_last)


def test_use_winograd_swaps_only_the_convolutions_it_suits():
    def conv(cin=64, cout=96, k=5, **kw):
        return nn.Conv2d(cin, cout, k, padding=kw.pop("padding", k // 2), **kw)

    model = nn.Sequential(conv(), conv(padding="same"),  # swapped
                          conv(k=3), conv(stride=2), conv(dilation=2), conv(groups=2),
                          conv(padding_mode="reflect"), conv(cin=32), conv(cout=64),
                          nn.ConvTranspose2d(64, 96, 5, padding=2))
    assert use_winograd(model) == 2
    assert [type(m) for m in model[:3]] == [WinogradConv2d, WinogradConv2d, nn.Conv2d]
    assert not any(isinstance(m, WinogradConv2d) for m in model[2:])
    assert use_winograd(model) == 0  # a second call swaps nothing new


def test_use_winograd_keeps_parameters_state_dict_and_optimizer():
    torch.manual_seed(0)
    model = build_model("convlstm")  # built, never run: full size is cheap here
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    # all cell convolutions but the bottom encoder cell's 16-channel input convolution
    assert use_winograd(model) == 10
    assert all(p is params[name] for name, p in model.named_parameters())
    assert list(model.state_dict()) == list(state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    model.load_state_dict(state)  # an old checkpoint loads as it is
    conv = model.encoder.stages[0].cell.hidden_conv
    assert isinstance(conv, WinogradConv2d)
    conv.weight.grad = torch.ones_like(conv.weight)
    optimizer.step()  # the optimizer built before the swap updates the swapped conv
    assert torch.equal(conv.weight, state["encoder.stages.0.cell.hidden_conv.weight"] - 1)


@pytest.mark.parametrize("cell,options", [
    ("convlstm", {}), ("convlstm", {"peephole": True}), ("convgru", {}), ("trajgru", {"links": 3}),
])
def test_model_outputs_and_gradients_match_direct(cell, options, everywhere):
    """Whole models in float64: use_winograd changes only rounding."""
    torch.manual_seed(0)
    model = randomize(build_model(tiny_5x5(cell, **options)).double())
    x = torch.rand(2, 3, 1, 32, 32, dtype=torch.float64)
    results = []
    for swap in (False, True):
        if swap:
            assert use_winograd(model) > 0
        model.zero_grad()
        y = model(x, frames_output=2)
        (y ** 2).sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-10)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_weights_are_transformed_once_per_forward(everywhere, transforms):
    """Each conv transforms its weights once per forward, however many steps reuse them,
    and never reuses them in the next forward: not after an optimizer step, and not
    without one either (the first forward's graph is freed by then)."""
    torch.manual_seed(0)
    model = randomize(build_model(tiny_5x5()).double())
    direct = build_model(tiny_5x5()).double()
    direct.load_state_dict(model.state_dict())
    assert use_winograd(model) == 7
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.rand(2, 3, 1, 32, 32, dtype=torch.float64)
    for step in range(3):
        transforms.clear()
        model.zero_grad()
        direct.zero_grad()
        y = model(x, frames_output=3)
        assert len(transforms) == 7, step
        y.square().sum().backward()
        want = direct(x, frames_output=3)
        want.square().sum().backward()
        torch.testing.assert_close(y, want, rtol=0, atol=1e-10)
        for p, q in zip(model.parameters(), direct.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-9)
        if step == 1:  # steps 0 and 1 run with the same weights
            optimizer.step()
            with torch.no_grad():
                for p, q in zip(model.parameters(), direct.parameters(), strict=True):
                    q.copy_(p)
    with torch.no_grad():
        transforms.clear()
        model(x, frames_output=3)
        assert len(transforms) == 7


def test_a_weight_changed_within_a_forward_is_transformed_again(everywhere, transforms):
    """Reuse is keyed on the weight's version and on grad mode, inside one forward too."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 5, padding=2).double()

        def forward(self, x):
            with torch.no_grad():
                first = self.conv(x)
            again = self.conv(x)  # grad mode changed: a transform with a graph
            with torch.no_grad():
                self.conv.weight.add_(0.5)  # as an optimizer step would
            return first, again, self.conv(x)

    model = Twice()
    use_winograd(model)
    x = torch.randn(1, 3, 7, 6, dtype=torch.float64)
    first, again, changed = model(x)
    assert len(transforms) == 3 and again.requires_grad
    conv = model.conv
    torch.testing.assert_close(changed, F.conv2d(x, conv.weight, conv.bias, padding=2),
                               rtol=0, atol=1e-11)
    assert torch.equal(first, again.detach())
    assert not torch.allclose(first, changed)


def test_outside_a_model_forward_nothing_is_reused(everywhere, transforms):
    """A cell run by itself (not through the model use_winograd saw) transforms per call."""
    model = nn.Module()
    model.cell = ConvLSTMCell(8, 8, 5).double()
    use_winograd(model)
    run_cell(model.cell, torch.rand(2, 4, 8, 6, 6, dtype=torch.float64))
    assert len(transforms) == 1 + 3  # the batched input conv, the state conv at steps 1-3


def test_autocast_runs_direct(everywhere):
    """Winograd's transforms would amplify bf16 rounding: autocast keeps the direct path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 8, 5, padding=2))
    x = torch.randn(2, 32, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = model(x)
        use_winograd(model)
        assert not model[0].winograd_applies(x)
        same = model(x)
    assert same.dtype == torch.bfloat16
    assert torch.equal(same, direct)


@pytest.mark.slow
def test_compiles_with_torch_compile(monkeypatch):
    """torch.compile traces the Winograd path (custom autograd functions; no weight reuse
    while compiling) to the same outputs and gradients as eager Winograd."""

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = ConvLSTMCell(64, 96, 5)

        def forward(self, x):
            return run_cell(self.cell, x)[0]

    torch.manual_seed(0)
    model = Wrapped()
    assert use_winograd(model) == 2
    x = torch.randn(1, 3, 64, 4, 4)
    eager = model(x)
    eager.square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    traced = []
    monkeypatch.setattr(winograd, "_winograd", lambda *a: traced.append(1) or real_winograd(*a))
    compiled = torch.compile(model)(x)
    compiled.square().sum().backward()
    assert traced, "the compiled model did not trace the Winograd path"
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, expect in zip([p.grad for p in model.parameters()], want, strict=True):
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
