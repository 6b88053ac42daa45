"""TrajGRU (Shi et al. 2017): the warp, the cell against the paper's equations, the preset."""

import pytest
import torch
import torch.nn.functional as F

from ConvRNN import TrajGRUCell, run_cell
from model import build_model, count_parameters
from net_params import get_preset
from helpers import randomize



def reference_warp(h, u, v):
    """out(y, x) = h(y − v, x − u) by bilinear interpolation, zero outside; u, v (B, H, W) in pixels.

    Built from indexing, not grid_sample, so it checks the cell's coordinate handling.
    """
    B, C, H, W = h.shape
    ys = torch.arange(H, dtype=h.dtype).view(1, H, 1)
    xs = torch.arange(W, dtype=h.dtype).view(1, 1, W)
    sy, sx = ys - v, xs - u  # (B, H, W) sample positions
    y0, x0 = sy.floor(), sx.floor()
    fy, fx = sy - y0, sx - x0
    batch = torch.arange(B).view(B, 1, 1)
    out = torch.zeros(B, H, W, C, dtype=h.dtype)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yi, xi = y0 + dy, x0 + dx
            inside = (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
            values = h.permute(0, 2, 3, 1)[batch, yi.clamp(0, H - 1).long(),
                                           xi.clamp(0, W - 1).long()]  # (B, H, W, C)
            out = out + (wy * wx * inside).unsqueeze(-1) * values
    return out.permute(0, 3, 1, 2)  # (B, C, H, W)


def maybe_group_norm(norm, t):
    if isinstance(norm, torch.nn.GroupNorm):
        return F.group_norm(t, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return t


def trajgru_reference(cell, x, h):
    """Shi et al. 2017 TrajGRU, one step, transcribed link by link, as the official code:
    i2h and h2h each with a bias, of which only i2h's candidate part is not redundant.
    x=None is a zero input; a cell without input channels has no i2h at all."""
    L, pad, C = cell.links, cell.kernel_size // 2, cell.hidden_channels
    f = F.conv2d(h, cell.flow_hidden_conv.weight, cell.flow_hidden_conv.bias, padding=pad)
    if x is not None:
        f = f + F.conv2d(x, cell.flow_input_conv.weight, padding=pad)
    flows = F.conv2d(F.leaky_relu(f, 0.2), cell.flow_out_conv.weight, cell.flow_out_conv.bias,
                     padding=pad)
    warped = [reference_warp(h, flows[:, 2 * l], flows[:, 2 * l + 1]) for l in range(L)]
    h2h = F.conv2d(torch.cat(warped, 1), cell.hidden_conv.weight, cell.hidden_conv.bias)
    h2h_r, h2h_z, h2h_h = h2h.chunk(3, 1)
    if cell.input_channels == 0:
        i2h_r = i2h_z = i2h_h = torch.zeros_like(h)
    else:
        if x is None:
            x = h.new_zeros(h.shape[0], cell.input_channels, *h.shape[2:])
        # r's and z's i2h biases would only add to h2h's: zero here, one bias per gate.
        bias = torch.cat([h.new_zeros(2 * C), cell.candidate_input_bias])
        i2h = F.conv2d(x, cell.input_conv.weight, bias,
                       padding=cell.input_conv.kernel_size[0] // 2)
        i2h_r, i2h_z, i2h_h = i2h.chunk(3, 1)
    gates = maybe_group_norm(cell.gate_norm, torch.cat([i2h_r + h2h_r, i2h_z + h2h_z], 1))
    r, z = torch.sigmoid(gates).chunk(2, 1)
    new = F.leaky_relu(maybe_group_norm(cell.candidate_norm, i2h_h + r * h2h_h), 0.2)
    return (1 - z) * new + z * h


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_zero_flow_is_the_identity_warp(dtype, atol):
    # float32 is only near-exact: grid_sample's [-1, 1] coordinates of pixel i, such as
    # -1 + 4 * 2/6, round, and the warp then mixes in ~1e-7 of a neighbour.
    torch.manual_seed(0)
    cell = TrajGRUCell(3, 6, 5, links=4).to(dtype)
    x, h = torch.randn(2, 3, 7, 9, dtype=dtype), torch.randn(2, 6, 7, 9, dtype=dtype)
    flows = cell.flows(cell.project_input(x)[:, 3 * 6:], h)
    assert flows.shape == (2, 2 * 4, 7, 9)
    assert flows.abs().max() == 0, "a fresh cell must start from zero flow"
    warped = cell.warp(h, flows)
    torch.testing.assert_close(warped, h.repeat(1, 4, 1, 1), atol=atol, rtol=0)


def test_integer_flow_shifts_the_state_by_that_many_pixels():
    torch.manual_seed(0)
    shifts = [(0, 0), (2, 0), (0, -3), (1, 2), (-2, -1)]  # (dx, dy) per link
    cell = TrajGRUCell(1, 3, 3, links=len(shifts))
    B, C, H, W = 2, 3, 10, 12
    h = torch.randn(B, C, H, W)
    flows = torch.tensor(shifts, dtype=h.dtype).view(1, -1, 1, 1).expand(B, -1, H, W)  # (B, 2L, H, W)
    warped = cell.warp(h, flows).unflatten(1, (len(shifts), C))  # (B, L, C, H, W)
    band = 3  # the largest shift: what rolls in there is zeros, not the far edge
    for l, (dx, dy) in enumerate(shifts):
        expected = torch.roll(h, shifts=(dy, dx), dims=(2, 3))
        torch.testing.assert_close(warped[:, l, :, band:-band, band:-band],
                                   expected[..., band:-band, band:-band], atol=1e-5, rtol=0)
    # Outside the map is zero: shifting right by 2 empties the first two columns.
    assert warped[:, 1, :, :, :2].abs().max() == 0


@pytest.mark.parametrize("norm", [None, "group"])
@pytest.mark.parametrize("with_input", [True, False])
def test_trajgru_matches_paper_equations(norm, with_input):
    torch.manual_seed(0)
    cell = randomize(TrajGRUCell(3, 8, 5, links=3, norm=norm).double())
    assert cell.candidate_input_bias.abs().min() > 0.001  # b_h must count in the comparison
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64) if with_input else None
    h = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    # The random flows are pixels wide and sample fractions, borders and outside the map.
    flows = cell.flows(None if x is None else cell.project_input(x)[:, 24:], h)
    assert flows.abs().max() > 2 and (flows - flows.round()).abs().max() > 0.1
    out, h_new = cell(x, h)
    torch.testing.assert_close(out, trajgru_reference(cell, x, h), atol=1e-10, rtol=0)
    assert out is h_new


def test_warp_in_bfloat16_samples_at_float32_positions():
    torch.manual_seed(0)
    cell = TrajGRUCell(1, 4, 3, links=2)
    h, flows = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16) * 3
    warped = cell.warp(h.bfloat16(), flows.bfloat16())
    assert warped.dtype == torch.bfloat16
    exact = cell.warp(h.bfloat16().float(), flows.bfloat16().float())
    torch.testing.assert_close(warped.float(), exact, atol=2e-2, rtol=1e-2)


def test_gradients_reach_every_parameter_and_zero_flow_init():
    torch.manual_seed(0)
    cell = TrajGRUCell(2, 4, 3, links=3)
    x = torch.randn(2, 3, 2, 8, 8)

    def zero_grads():
        cell.zero_grad(set_to_none=True)
        outs, _ = run_cell(cell, x)
        outs.square().sum().backward()
        return {n for n, p in cell.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}

    # At zero flow the last flow conv still learns: the warp's gradient with respect to
    # its sample positions is the state's spatial difference, not zero. The two convs
    # before it get exactly zero, because their gradient passes through its zero weights.
    assert zero_grads() == {"flow_input_conv.weight", "flow_hidden_conv.weight",
                            "flow_hidden_conv.bias"}
    randomize(cell)
    assert zero_grads() == set()


def test_none_input_and_none_state_mean_zeros():
    torch.manual_seed(0)
    cell = randomize(TrajGRUCell(3, 8, 3, links=2, norm="group").double())
    B, H, W = 2, 5, 6
    state = cell(torch.randn(B, 3, H, W, dtype=torch.float64), None)[1]  # a non-zero state
    calls = []
    hooks = [cell.input_conv.register_forward_hook(lambda *a: calls.append(1)),
             cell.flow_input_conv.register_forward_hook(lambda *a: calls.append(1))]
    out_none, _ = cell(None, state)
    assert calls == [], "x=None must skip both input convolutions"
    out_zero, _ = cell(torch.zeros(B, 3, H, W, dtype=torch.float64), state)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(out_none, out_zero, atol=1e-12, rtol=0)

    x = torch.randn(B, 3, H, W, dtype=torch.float64)
    out_implicit, _ = cell(x, None)
    out_explicit, _ = cell(x, torch.zeros(B, 8, H, W, dtype=torch.float64))
    torch.testing.assert_close(out_implicit, out_explicit, atol=1e-12, rtol=0)


def test_input_free_cell_has_no_input_convs():
    cell = randomize(TrajGRUCell(0, 4, 3, links=2))
    assert cell.input_conv is None and cell.flow_input_conv is None
    h = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(cell(None, h)[0], trajgru_reference(cell, None, h),
                               atol=1e-5, rtol=0)
    outs, last = run_cell(cell, None, h, steps=3)
    assert outs.shape == (1, 3, 4, 6, 6) and last is not None
    with pytest.raises(ValueError, match="input_channels=0"):
        cell(torch.randn(1, 3, 6, 6), h)
    with pytest.raises(ValueError, match="needs an input or a state"):
        cell(None, None)


def test_state_dicts_without_the_candidate_bias_load_as_the_old_cell():
    torch.manual_seed(0)
    old = randomize(TrajGRUCell(3, 8, 5, links=3).double())
    with torch.no_grad():
        old.candidate_input_bias.zero_()  # what a cell computed before b_h existed
    state = old.state_dict()
    del state["candidate_input_bias"]
    new = randomize(TrajGRUCell(3, 8, 5, links=3).double(), seed=1)
    new.load_state_dict(state)  # strict
    assert "candidate_input_bias" not in state, "the caller's dict must stay as it was"
    assert new.candidate_input_bias.abs().max() == 0
    x, h = (torch.randn(2, n, 9, 7, dtype=torch.float64) for n in (3, 8))
    torch.testing.assert_close(new(x, h)[0], old(x, h)[0], atol=1e-12, rtol=0)


def test_old_trajgru_checkpoints_load_and_other_keys_stay_required():
    state = randomize(build_model("trajgru")).state_dict()
    old = {k: v for k, v in state.items() if not k.endswith("candidate_input_bias")}
    assert len(state) - len(old) == 5  # every cell but the forecaster's top one, which has no input
    net = build_model("trajgru")
    net.load_state_dict(old)
    assert all(p.abs().max() == 0 for n, p in net.named_parameters()
               if n.endswith("candidate_input_bias"))
    with pytest.raises(RuntimeError, match="Missing key.*encoder.stages.0.cell.hidden_conv.bias"):
        net.load_state_dict({k: v for k, v in old.items()
                             if k != "encoder.stages.0.cell.hidden_conv.bias"})
    top = "forecaster.stages.0.cell.candidate_input_bias"  # the top cell has no input
    with pytest.raises(RuntimeError, match=f"Unexpected key.*{top}"):
        net.load_state_dict({**state, top: torch.zeros(96)})


def test_bad_links_are_rejected():
    with pytest.raises(ValueError, match="links >= 1"):
        TrajGRUCell(1, 4, 3, links=0)
    with pytest.raises(ValueError, match="odd"):
        TrajGRUCell(1, 4, 4)


def test_runner_batched_input_conv_equals_stepping():
    torch.manual_seed(0)
    cell = randomize(TrajGRUCell(2, 8, 3, links=3, norm="group").double())
    x = torch.randn(3, 4, 2, 6, 6, dtype=torch.float64, requires_grad=True)

    outs, last = run_cell(cell, x)
    grads = torch.autograd.grad(outs.pow(2).sum() + last.sum(), [x, *cell.parameters()])

    state, stepped = None, []
    for t in range(x.shape[1]):
        out, state = cell(x[:, t], state)
        stepped.append(out)
    stepped = torch.stack(stepped, 1)
    grads_ref = torch.autograd.grad(stepped.pow(2).sum() + state.sum(), [x, *cell.parameters()])

    torch.testing.assert_close(outs, stepped, atol=1e-10, rtol=0)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=0)


def test_trajgru_preset_builds_runs_and_trains_every_parameter():
    preset = get_preset("trajgru")
    assert preset.norm is None and preset.cell_options == {"links": 13}
    torch.manual_seed(0)
    net = build_model(preset)
    # b_h of the five cells with an input (64 + 96 + 96 + 96 + 64 = 416) included.
    assert count_parameters(net) == 3_869_853
    cells = [m for m in net.modules() if isinstance(m, TrajGRUCell)]
    assert len(cells) == 6 and all(c.links == 13 for c in cells)
    assert not any(type(m).__name__ in ("ConvLSTMCell", "ConvGRUCell") for m in net.modules())

    def zero_grads():
        net.zero_grad(set_to_none=True)
        # Fully convolutional: 16x16 exercises every weight at a fraction of the cost.
        y = net(torch.rand(1, 2, 1, 16, 16), frames_output=2)
        assert y.shape == (1, 2, 1, 16, 16)
        y.square().mean().backward()
        return {n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}

    # At init only the flow convs before the zero-initialised one get no gradient (see above).
    assert {n.rsplit(".", 2)[-2] for n in zero_grads()} == {"flow_input_conv", "flow_hidden_conv"}
    with torch.no_grad():
        for c in cells:
            c.flow_out_conv.weight.normal_(std=0.01)
    assert zero_grads() == set()
