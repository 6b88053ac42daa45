"""tools/textbook.py, the textbook baseline of tools/bench.py: it computes what the fast
model computes, outputs and gradients, and has the original repo's parameter counts."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model import build_model, count_parameters
from net_params import get_preset
from tools.textbook import build_textbook, load_fast_weights
from helpers import randomize, small_original


@pytest.mark.parametrize("preset", [
    small_original("convlstm"),
    small_original("convlstm", peephole=True),
    small_original("convgru"),
    dataclasses.replace(small_original("convgru"), head_activation="leaky"),
], ids=["convlstm", "convlstm-peephole", "convgru", "convgru-leaky-head"])
def test_textbook_and_fast_model_agree_on_outputs_and_gradients(preset):
    torch.manual_seed(0)
    fast = randomize(build_model(preset).double())
    ref = build_textbook(preset).double()
    load_fast_weights(ref, fast)
    x = torch.rand(2, 3, 1, 16, 16, dtype=torch.float64)
    target = torch.rand(2, 2, 1, 16, 16, dtype=torch.float64)

    out_fast, out_ref = fast(x, frames_output=2), ref(x, frames_output=2)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-10, rtol=0)
    if preset.head_activation == "leaky":
        assert (out_fast < 0).any() and (out_fast > 0).any(), "both slopes must be exercised"

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
def test_textbook_has_the_original_repos_parameter_count(name, original):
    # The textbook keeps the forecaster top cell's input weights, which only see zeros.
    assert count_parameters(build_textbook(get_preset(name))) == original
