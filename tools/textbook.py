"""The textbook encoder-forecaster as the original repo computed it: tools/bench.py's baseline.

Same architecture as a net_params preset, computed the straightforward way:

* one convolution over cat(x, h), with its bias, per cell and time step;
* explicit zeros wherever there is nothing: the zero initial state is convolved like any
  other state, and the forecaster's top cell convolves cat(zeros, h), with zeros as wide
  as the stage's hidden channels (the original gave that cell 96 input channels it never
  fed);
* no time-batched input convolution, fp32, no compile.

So for the original architecture it has the original repo's parameter counts (convlstm
9,032,225, convgru 6,880,289) and FLOPs. Training never uses it: tools/bench.py times it to
say how much the fast model gains, and tests/test_textbook.py checks that both compute the
same function (`load_fast_weights` copies a fast model's weights in). The head is the fast
model's (`decoder.build_head`), so it honours the preset's head_activation.
"""

from __future__ import annotations

import torch
from torch import nn

from ConvRNN import ConvGRUCell, ConvLSTMCell, norm_layer
from decoder import build_head
from encoder import conv_block, per_frame
from net_params import Preset


class TextbookConvLSTMCell(nn.Module):
    """Shi et al. 2015 eq. 3 on cat(x, h). x: (B, C_in, H, W); state (h, c) -> (h, (h, c))."""

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: int, *,
                 peephole: bool = False, norm: str | None = None):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.conv = nn.Conv2d(input_channels + hidden_channels, 4 * hidden_channels,
                              kernel_size, padding=kernel_size // 2)
        self.norm = norm_layer(norm, 4 * hidden_channels)
        self.peephole = (nn.Parameter(torch.zeros(3, hidden_channels, 1, 1))
                         if peephole else None)

    def forward(self, x, state):
        h_prev, c_prev = state
        i, f, g, o = self.norm(self.conv(torch.cat([x, h_prev], dim=1))).chunk(4, dim=1)
        if self.peephole is not None:
            i = i + self.peephole[0] * c_prev
            f = f + self.peephole[1] * c_prev
        c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
        if self.peephole is not None:
            o = o + self.peephole[2] * c
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)

    def zero_state(self, like: torch.Tensor):
        zeros = like.new_zeros(like.shape[0], self.hidden_channels, *like.shape[2:])
        return zeros, zeros.clone()


class TextbookConvGRUCell(nn.Module):
    """The GRU of ConvRNN.ConvGRUCell on cat(x, h) and cat(x, r∘h). state h -> (h, h)."""

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: int, *,
                 norm: str | None = None):
        super().__init__()
        self.hidden_channels = hidden_channels
        pad = kernel_size // 2
        both = input_channels + hidden_channels
        self.gate_conv = nn.Conv2d(both, 2 * hidden_channels, kernel_size, padding=pad)
        self.candidate_conv = nn.Conv2d(both, hidden_channels, kernel_size, padding=pad)
        self.gate_norm = norm_layer(norm, 2 * hidden_channels)
        self.candidate_norm = norm_layer(norm, hidden_channels)

    def forward(self, x, h_prev):
        gates = self.gate_norm(self.gate_conv(torch.cat([x, h_prev], dim=1)))
        z, r = torch.sigmoid(gates).chunk(2, dim=1)
        n = torch.tanh(self.candidate_norm(self.candidate_conv(torch.cat([x, r * h_prev], dim=1))))
        h = (1 - z) * n + z * h_prev
        return h, h

    def zero_state(self, like: torch.Tensor):
        return like.new_zeros(like.shape[0], self.hidden_channels, *like.shape[2:])


TEXTBOOK_CELLS = {"convlstm": TextbookConvLSTMCell, "convgru": TextbookConvGRUCell}


def run_textbook_cell(cell, inputs: torch.Tensor, state):
    """Textbook loop, one cat-conv per step. inputs (B, T, C_in, H, W) -> (B, T, C_hid, H, W)."""
    outputs = []
    for t in range(inputs.shape[1]):
        out, state = cell(inputs[:, t], state)
        outputs.append(out)
    return torch.stack(outputs, dim=1), state


class TextbookEncoderForecaster(nn.Module):
    """(B, T_in, C, H, W) -> (B, T_out, C, H, W), like model.EncoderForecaster, the slow way.

    Module names mirror the fast model (encoder.stages[k].down/.cell,
    forecaster.stages[k].cell/.up, forecaster.head) so the blocks' weights load by name.
    """

    def __init__(self, preset: Preset):
        super().__init__()
        if preset.cell not in TEXTBOOK_CELLS:
            raise ValueError(f"textbook.py has no textbook {preset.cell!r} cell; "
                             f"it knows {', '.join(sorted(TEXTBOOK_CELLS))}")
        self.preset = preset
        cell_cls = TEXTBOOK_CELLS[preset.cell]
        stages = preset.stages

        def cell(input_channels, hidden):
            return cell_cls(input_channels, hidden, preset.cell_kernel, norm=preset.norm,
                            **preset.cell_options)

        self.encoder = nn.Module()
        self.encoder.stages = nn.ModuleList()
        for s in stages:
            stage = nn.Module()
            stage.down, stage.cell = conv_block(s.down), cell(s.down.out_channels, s.hidden)
            self.encoder.stages.append(stage)
        self.forecaster = nn.Module()
        self.forecaster.stages = nn.ModuleList()
        for k in reversed(range(len(stages))):  # top first, the order they run in
            top = k == len(stages) - 1
            # The original's top cell took a (zero) input as wide as its hidden state.
            stage = nn.Module()
            stage.cell = cell(stages[k].hidden if top else stages[k + 1].up.out_channels,
                              stages[k].hidden)
            stage.up = conv_block(stages[k].up)
            self.forecaster.stages.append(stage)
        self.forecaster.head = build_head(preset)

    def forward(self, x: torch.Tensor, frames_output: int | None = None) -> torch.Tensor:
        frames_output = self.preset.frames_output if frames_output is None else frames_output
        states = []
        for stage in self.encoder.stages:
            x = per_frame(stage.down, x)                                   # (B, T, C_k, H_k, W_k)
            x, state = run_textbook_cell(stage.cell, x, stage.cell.zero_state(x[:, 0]))
            states.append(state)
        top_hidden = self.preset.stages[-1].hidden
        B, (H, W) = x.shape[0], x.shape[-2:]
        x = x.new_zeros(B, frames_output, top_hidden, H, W)  # the top cell's all-zero input
        for stage, state in zip(self.forecaster.stages, reversed(states)):
            x, _ = run_textbook_cell(stage.cell, x, state)                # (B, T, hidden_k, ...)
            x = per_frame(stage.up, x)                                     # (B, T, C, H_k-1, W_k-1)
        return per_frame(self.forecaster.head, x)                         # (B, T, C_frame, H, W)


def build_textbook(preset: Preset) -> TextbookEncoderForecaster:
    return TextbookEncoderForecaster(preset)


@torch.no_grad()
def load_fast_weights(textbook: TextbookEncoderForecaster, fast: nn.Module) -> None:
    """Copy a model.EncoderForecaster's weights into ``textbook``, so both compute the same.

    The split input/state convolutions are concatenated along the input channels into the
    cat(x, h) convolution. The top forecaster cell's input weights multiply zeros and are
    set to zero.
    """
    ref_cells = [s.cell for s in textbook.encoder.stages] + \
                [s.cell for s in textbook.forecaster.stages]
    fast_cells = [s.cell for s in fast.encoder.stages] + [s.cell for s in fast.forecaster.stages]
    for ref, cell in zip(ref_cells, fast_cells):
        if isinstance(cell, ConvLSTMCell):
            pairs = [(ref.conv, slice(None), cell.hidden_conv)]
        elif isinstance(cell, ConvGRUCell):
            C = cell.hidden_channels
            pairs = [(ref.gate_conv, slice(0, 2 * C), cell.gate_conv),
                     (ref.candidate_conv, slice(2 * C, 3 * C), cell.candidate_conv)]
        else:
            raise ValueError(f"load_fast_weights knows no textbook form of {type(cell).__name__}")
        for ref_conv, rows, hidden_conv in pairs:
            C_in = ref_conv.in_channels - hidden_conv.in_channels
            ref_conv.weight[:, :C_in] = 0 if cell.input_conv is None else cell.input_conv.weight[rows]
            ref_conv.weight[:, C_in:] = hidden_conv.weight
            ref_conv.bias.copy_(hidden_conv.bias)
    # Everything else (norms, peepholes, down/up blocks, head) has the same names.
    cell_conv = ("input_conv", "hidden_conv", "gate_conv", "candidate_conv")
    ref_params = dict(textbook.named_parameters())
    for name, p in fast.named_parameters():
        if ".cell." in name and any(key in name for key in cell_conv):
            continue
        ref_params[name].copy_(p)
