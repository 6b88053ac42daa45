"""Model core: cells against the paper's equations, the runner, the encoder-forecaster."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import model
from ConvRNN import ConvGRUCell, ConvLSTMCell, group_norm, run_cell
from model import build_model, check_preset, count_parameters
from net_params import PRESETS, Conv, Preset, Stage, get_preset
from utils import UsageError
from helpers import randomize


def lstm_reference(cell, x, h, c):
    """Shi et al. 2015 eq. 3 transcribed on cat(x, h), with W_c as per-channel weights."""
    W = torch.cat([cell.input_conv.weight, cell.hidden_conv.weight], dim=1)
    gates = F.conv2d(torch.cat([x, h], dim=1), W, cell.hidden_conv.bias,
                     padding=cell.kernel_size // 2)
    if isinstance(cell.norm, torch.nn.GroupNorm):
        gates = F.group_norm(gates, cell.norm.num_groups, cell.norm.weight, cell.norm.bias,
                             cell.norm.eps)
    gi, gf, gc, go = gates.chunk(4, dim=1)
    w_ci, w_cf, w_co = (cell.peephole if cell.peephole is not None
                        else torch.zeros(3, 1, 1, 1, dtype=x.dtype))
    i = torch.sigmoid(gi + w_ci * c)
    f = torch.sigmoid(gf + w_cf * c)
    c_new = f * c + i * torch.tanh(gc)
    o = torch.sigmoid(go + w_co * c_new)
    return o * torch.tanh(c_new), c_new


def gru_reference(cell, x, h):
    C = cell.hidden_channels
    pad = cell.kernel_size // 2
    Wx = cell.input_conv.weight
    gates = F.conv2d(torch.cat([x, h], 1), torch.cat([Wx[:2 * C], cell.gate_conv.weight], 1),
                     cell.gate_conv.bias, padding=pad)
    gates = F.group_norm(gates, cell.gate_norm.num_groups, cell.gate_norm.weight,
                         cell.gate_norm.bias, cell.gate_norm.eps)
    z, r = torch.sigmoid(gates).chunk(2, 1)
    cand = F.conv2d(torch.cat([x, r * h], 1),
                    torch.cat([Wx[2 * C:], cell.candidate_conv.weight], 1),
                    cell.candidate_conv.bias, padding=pad)
    cand = F.group_norm(cand, cell.candidate_norm.num_groups, cell.candidate_norm.weight,
                        cell.candidate_norm.bias, cell.candidate_norm.eps)
    return (1 - z) * torch.tanh(cand) + z * h


@pytest.mark.parametrize("peephole", [False, True])
@pytest.mark.parametrize("norm", [None, "group"])
def test_convlstm_matches_paper_equations(peephole, norm):
    torch.manual_seed(0)
    cell = randomize(ConvLSTMCell(3, 8, 5, peephole=peephole, norm=norm).double())
    x, h, c = (torch.randn(2, n, 9, 7, dtype=torch.float64) for n in (3, 8, 8))
    out, (h_new, c_new) = cell(x, (h, c))
    h_ref, c_ref = lstm_reference(cell, x, h, c)
    torch.testing.assert_close(out, h_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(h_new, h_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(c_new, c_ref, atol=1e-6, rtol=0)


def test_convgru_matches_gru_equations():
    torch.manual_seed(0)
    cell = randomize(ConvGRUCell(3, 40, 3, norm="group").double())
    x, h = torch.randn(2, 3, 6, 5, dtype=torch.float64), torch.randn(2, 40, 6, 5, dtype=torch.float64)
    out, h_new = cell(x, h)
    torch.testing.assert_close(out, gru_reference(cell, x, h), atol=1e-6, rtol=0)
    assert out is h_new


@pytest.mark.parametrize("make", [
    lambda: ConvLSTMCell(3, 8, 3, norm="group"),
    lambda: ConvLSTMCell(3, 8, 3, peephole=True),
    lambda: ConvGRUCell(3, 8, 3, norm="group"),
])
def test_none_input_and_none_state_mean_zeros(make):
    torch.manual_seed(0)
    cell = randomize(make().double())
    B, H, W = 2, 5, 6
    state = cell(torch.randn(B, 3, H, W, dtype=torch.float64), None)[1]  # a non-zero state
    calls = []
    hook = cell.input_conv.register_forward_hook(lambda *a: calls.append(1))
    out_none, _ = cell(None, state)
    assert calls == [], "x=None must skip the input convolution"
    out_zero, _ = cell(torch.zeros(B, 3, H, W, dtype=torch.float64), state)
    hook.remove()
    torch.testing.assert_close(out_none, out_zero, atol=1e-12, rtol=0)

    x = torch.randn(B, 3, H, W, dtype=torch.float64)
    zeros = torch.zeros(B, 8, H, W, dtype=torch.float64)
    zero_state = (zeros, zeros) if isinstance(cell, ConvLSTMCell) else zeros
    out_implicit, s_implicit = cell(x, None)
    out_explicit, s_explicit = cell(x, zero_state)
    torch.testing.assert_close(out_implicit, out_explicit, atol=1e-12, rtol=0)
    torch.testing.assert_close(s_implicit, s_explicit, atol=1e-12, rtol=0)


def test_input_free_cell_has_no_input_conv():
    cell = ConvLSTMCell(0, 8, 3)
    assert cell.input_conv is None
    h = torch.randn(1, 8, 4, 4)
    out, _ = cell(None, (h, h))
    assert out.shape == h.shape
    with pytest.raises(ValueError, match="input_channels=0"):
        cell(torch.randn(1, 3, 4, 4), (h, h))
    with pytest.raises(ValueError, match="needs an input or a state"):
        cell(None, None)


@pytest.mark.parametrize("kernel", [2, 4])
def test_even_cell_kernel_is_rejected(kernel):
    with pytest.raises(ValueError, match="odd"):
        ConvLSTMCell(1, 4, kernel)
    with pytest.raises(ValueError, match="odd"):
        ConvGRUCell(1, 4, kernel)


@pytest.mark.parametrize("channels", [1, 3, 8, 20, 31, 64, 96, 256, 384])
def test_group_norm_fits_any_channel_count(channels):
    norm = group_norm(channels)
    assert channels % norm.num_groups == 0
    if channels % 32 == 0:  # the original's choice wherever it worked
        assert norm.num_groups == channels // 32


@pytest.mark.parametrize("cell_cls", [ConvLSTMCell, ConvGRUCell])
def test_runner_batched_input_conv_equals_stepping(cell_cls):
    torch.manual_seed(0)
    cell = randomize(cell_cls(2, 8, 3, norm="group").double())
    x = torch.randn(3, 4, 2, 6, 6, dtype=torch.float64, requires_grad=True)

    outs, last = run_cell(cell, x)
    loss = outs.pow(2).sum() + sum(s.sum() for s in (last if isinstance(last, tuple) else (last,)))
    grads = torch.autograd.grad(loss, [x, *cell.parameters()])

    state, stepped = None, []
    for t in range(x.shape[1]):
        out, state = cell(x[:, t], state)
        stepped.append(out)
    stepped = torch.stack(stepped, 1)
    loss_ref = stepped.pow(2).sum() + sum(s.sum() for s in (state if isinstance(state, tuple) else (state,)))
    grads_ref = torch.autograd.grad(loss_ref, [x, *cell.parameters()])

    torch.testing.assert_close(outs, stepped, atol=1e-10, rtol=0)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=0)


def small_preset(n_stages: int, cell: str, channels: int = 4, image_size: int = 32) -> Preset:
    """n stages of `channels` channels, stride 1 then stride 2 (like the original)."""
    stages = []
    for k in range(n_stages):
        stride = 1 if k == 0 else 2
        stages.append(Stage(
            down=Conv(1 if k == 0 else channels, channels, 3, stride=stride),
            hidden=channels,
            up=Conv(channels, channels, 4, stride=2, transposed=True) if stride == 2
            else Conv(channels, channels, 3)))
    return Preset(cell=cell, stages=stages, head=[Conv(channels, 1, 1)], cell_kernel=3,
                  image_size=image_size)


@pytest.mark.parametrize("cell", ["convlstm", "convgru"])
@pytest.mark.parametrize("n_stages", [1, 2, 3, 4])
def test_output_shapes(cell, n_stages):
    torch.manual_seed(0)
    net = build_model(small_preset(n_stages, cell, image_size=16))
    for batch in (1, 3):
        for t_in, t_out in [(1, 13), (3, 10), (10, 3), (13, 1)]:
            y = net(torch.rand(batch, t_in, 1, 16, 16), frames_output=t_out)
            assert y.shape == (batch, t_out, 1, 16, 16)
    assert net(torch.rand(1, 3, 1, 16, 16)).shape[1] == net.preset.frames_output


def test_five_stages_work():
    net = build_model(small_preset(5, "convlstm", image_size=32))
    assert net(torch.rand(1, 2, 1, 32, 32), frames_output=2).shape == (1, 2, 1, 32, 32)


def trained_params_get_gradients(preset):
    torch.manual_seed(0)
    net = build_model(preset)
    with torch.no_grad():  # a zero-initialised weight (TrajGRU's last flow conv) would
        for p in net.parameters():  # block the gradient of what feeds it
            if not p.any():
                p.normal_(std=0.01)
    # Fully convolutional: a 16x16 input exercises every weight at a fraction of the cost.
    y = net(torch.rand(1, 2, 1, 16, 16), frames_output=2)
    assert y.shape == (1, 2, preset.frame_channels, 16, 16)
    y.square().mean().backward()
    return {n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_and_gradients_reach_every_parameter(name):
    assert trained_params_get_gradients(get_preset(name)) == set()


def test_peephole_weights_are_registered_and_trained():
    preset = get_preset("tiny")
    preset.cell_options = {"peephole": True}
    net = build_model(preset)
    names = [n for n, _ in net.named_parameters() if n.endswith("peephole")]
    assert len(names) == 2 * len(preset.stages)
    assert trained_params_get_gradients(preset) == set()


@pytest.mark.parametrize("name, cell_cls", [("convlstm", ConvLSTMCell), ("convgru", ConvGRUCell)])
def test_preset_builds_only_its_cell(name, cell_cls):
    net = build_model(name)
    cells = [m for m in net.modules() if isinstance(m, (ConvLSTMCell, ConvGRUCell))]
    assert len(cells) == 6
    assert all(type(m) is cell_cls for m in cells)


def test_parameter_counts_of_the_original_architecture():
    # The original's 9,032,225 and 6,880,289, less the input weights of the forecaster's
    # top cell, which only ever saw zeros (921,600 and 691,200).
    assert count_parameters(build_model("convlstm")) == 8_110_625
    assert count_parameters(build_model("convgru")) == 6_189_089


def test_the_small_presets_and_what_a_slow_machine_trains_instead():
    assert count_parameters(build_model("trajgru")) == 3_869_853
    assert count_parameters(build_model("tiny")) == 1_132_785
    assert count_parameters(build_model("tiny_lite")) == 648_953
    for name, preset in PRESETS.items():  # a lighter preset is known, lighter, and final
        if preset.lighter is not None:
            lighter = get_preset(preset.lighter)
            assert count_parameters(build_model(lighter)) < count_parameters(build_model(name))
            assert lighter.lighter is None and preset.lighter_below > 0
    assert get_preset("tiny").lighter == "tiny_lite"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trips_through_dict(name):
    preset = get_preset(name)
    assert Preset.from_dict(preset.to_dict()) == preset
    assert count_parameters(build_model(preset.to_dict())) == count_parameters(build_model(name))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_passes_check_preset(name):
    assert check_preset(get_preset(name)) is None
    assert not hasattr(model, "validate"), "'validate' is the validation set's word"


def test_head_activation_of_the_presets():
    # The original ends in LeakyReLU; trajgru follows Shi et al. 2017 and tiny is our own.
    expected = {"convlstm": "leaky", "convgru": "leaky", "trajgru": None, "tiny": None}
    assert expected.items() <= {n: p.head_activation for n, p in PRESETS.items()}.items()
    assert Preset(cell="convlstm", stages=[], head=[]).head_activation is None


def output_and_raw_head(net, x):
    """The model's output and what the head's last conv itself returned, both (B, T, C, H, W).

    A copy: the LeakyReLU after it works in place."""
    seen = []
    hook = net.forecaster.head[-1][0].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    y = net(x, frames_output=2)
    hook.remove()
    return y, seen[0].unflatten(0, y.shape[:2])


@pytest.mark.parametrize("activation", [None, "leaky"])
def test_head_activation_is_a_leaky_relu_after_the_last_conv_or_nothing(activation):
    preset = dataclasses.replace(get_preset("tiny"), head_activation=activation)
    torch.manual_seed(0)
    net = randomize(build_model(preset))
    y, raw = output_and_raw_head(net, torch.rand(2, 3, 1, 16, 16))
    assert (raw < 0).any(), "the test needs negative outputs to tell the two apart"
    torch.testing.assert_close(y, raw if activation is None else F.leaky_relu(raw, 0.2),
                               atol=0, rtol=0)


@pytest.mark.parametrize("name", ["convlstm", "convgru"])
def test_head_activation_changes_no_parameter(name):
    leaky = build_model(name)
    raw = build_model(dataclasses.replace(get_preset(name), head_activation=None))
    shapes = lambda net: [(k, t.shape) for k, t in net.state_dict().items()]
    assert shapes(leaky) == shapes(raw)
    assert "forecaster.head.0.0.weight" in leaky.state_dict()


@pytest.mark.parametrize("name", PRESETS)
def test_configs_saved_before_head_activation_rebuild_the_raw_output_model(name):
    old = get_preset(name).to_dict()
    del old["head_activation"]
    assert Preset.from_dict(old).head_activation is None
    torch.manual_seed(0)
    net = build_model(old)
    y, raw = output_and_raw_head(net, torch.rand(1, 2, 1, 16, 16))
    torch.testing.assert_close(y, raw, atol=0, rtol=0)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="convgru.*convlstm.*tiny"):
        build_model("convlsmt")


def edited(name, edit):
    preset = copy.deepcopy(PRESETS[name])
    edit(preset)
    return preset


@pytest.mark.parametrize("edit, message", [
    (lambda p: setattr(p.stages[1].down, "in_channels", 32),
     r"stage 2: down conv expects 32 input channels but stage 1's cell gives 64"),
    (lambda p: setattr(p.stages[2], "hidden", 128),
     r"stage 3: up block expects 96 input channels but the stage's cell gives 128"),
    (lambda p: setattr(p, "image_size", 66),
     r"stage 3: stride 2 does not divide the 33x33 map"),
    (lambda p: setattr(p.stages[0].down, "kernel", 4), r"stage 1 down: kernel 4 is even"),
    (lambda p: setattr(p, "cell_kernel", 4), r"cell_kernel 4 is even"),
    (lambda p: setattr(p.stages[1].up, "kernel", 3), r"stage 2 up: a transposed conv"),
    (lambda p: setattr(p.stages[1].up, "stride", 4), r"stage 2: up stride 4 must mirror down stride 2"),
    (lambda p: setattr(p.stages[0].up, "stride", 2), r"stage 1: a stride-2 up block must be transposed"),
    (lambda p: setattr(p.head[0], "out_channels", 3), r"head's last conv makes 3 channels"),
    (lambda p: setattr(p.head[0], "in_channels", 8), r"head conv 1: expects 8 input channels"),
    (lambda p: setattr(p, "cell", "convrnn"), r"unknown cell 'convrnn'"),
    (lambda p: setattr(p, "cell_options", {"peepole": True}),
     r"cell_options: convlstm cells take no option 'peepole'; their options are peephole "
     r"\(norm is the preset's own field\); fix net_params.py"),
    (lambda p: setattr(p, "cell_options", {"norm": "group"}), r"set the norm with the preset's norm"),
    (lambda p: setattr(p, "norm", "batch"), r"norm 'batch' is unknown"),
    (lambda p: setattr(p, "head_activation", "sigmoid"),
     r"head_activation 'sigmoid' is unknown; use 'leaky' .* or None .*; fix net_params.py"),
])
def test_bad_presets_fail_clearly(edit, message):
    with pytest.raises(UsageError, match=message):
        build_model(edited("convlstm", edit))


@pytest.mark.parametrize("name, options, message", [
    ("trajgru", {"link": 13}, r"trajgru cells take no option 'link'; their options are links, "
                              r"flow_channels, input_kernel_size"),
    ("convgru", {"peephole": True}, r"convgru cells take no options, got 'peephole'"),
])
def test_cell_options_name_what_the_cell_takes(name, options, message):
    with pytest.raises(UsageError, match=message):
        check_preset(dataclasses.replace(get_preset(name), cell_options=options))


def test_bad_input_size_is_a_clear_error():
    net = build_model("tiny")
    with pytest.raises(ValueError, match="divisible by 8"):  # tiny downsamples by 4, then 2
        net(torch.rand(1, 2, 1, 30, 30))
    with pytest.raises(ValueError, match=r"\(B, T, 1, H, W\)"):
        net(torch.rand(1, 2, 3, 32, 32))


def test_readme_preset_example_builds():
    import re
    from pathlib import Path
    import net_params
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    presets = {}
    exec(code, {**vars(net_params), "PRESETS": presets})
    (name, preset), = presets.items()
    y = build_model(preset)(torch.rand(1, 2, 1, 64, 64), frames_output=3)
    assert y.shape == (1, 3, 1, 64, 64)
