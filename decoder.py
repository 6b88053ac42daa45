"""Forecaster of the encoder-forecaster (Shi et al. 2015, §3.3).

The paper's "forecaster" is what the original repo (jhhuang96/ConvLSTM-PyTorch) calls the
"decoder". Its ``decoder.rnn3 -> stage3 -> rnn2 -> stage2 -> rnn1 -> stage1`` are our
``forecaster.stages[0..2]``, top first, each a ``cell`` then an ``up`` block; the last conv
of its ``stage1`` (conv4_leaky_1) is our ``forecaster.head``. docs/models.md lists the
differences, and tools/convert_original.py converts its checkpoints.

The stages run top first. Each cell starts from the encoder's last state of the same
stage (the paper copies the states across); the top cell has no input at all (its cell is
built with input_channels=0), every lower cell takes the upsampled outputs of the stage
above. The head maps the bottom stage's output to frames.
"""

from __future__ import annotations

import torch
from torch import nn

from ConvRNN import make_cell, run_cell
from encoder import conv_block, per_frame
from net_params import Preset


class ForecasterStage(nn.Module):
    def __init__(self, preset: Preset, index: int):
        super().__init__()
        stages = preset.stages
        top = index == len(stages) - 1
        input_channels = 0 if top else stages[index + 1].up.out_channels
        self.cell = make_cell(preset.cell, input_channels, stages[index].hidden,
                              preset.cell_kernel, norm=preset.norm, **preset.cell_options)
        self.up = conv_block(stages[index].up)


def build_head(preset: Preset) -> nn.Sequential:
    """The head's conv blocks: (N, stage 1's up channels, H, W) -> (N, C_frame, H, W).

    Every conv but the last is followed by LeakyReLU(0.2); the last one only with
    ``preset.head_activation == "leaky"``. The activation has no weights, so the state_dict
    keys are the same either way (``N.0.weight``).
    """
    last, leaky_last = len(preset.head) - 1, preset.head_activation == "leaky"
    return nn.Sequential(*(conv_block(spec, activation=i < last or leaky_last)
                           for i, spec in enumerate(preset.head)))


class Forecaster(nn.Module):
    """Encoder states (bottom first) -> (B, T_out, C, H, W) frames."""

    def __init__(self, preset: Preset):
        super().__init__()
        # Stored top first, the order they run in.
        self.stages = nn.ModuleList(ForecasterStage(preset, k)
                                    for k in reversed(range(len(preset.stages))))
        self.head = build_head(preset)

    def forward(self, states: list, frames_output: int) -> torch.Tensor:
        x = None  # the top cell has no input
        for stage, state in zip(self.stages, reversed(states)):
            x, _ = run_cell(stage.cell, x, state, steps=frames_output)  # (B, T, hidden_k, H_k, W_k)
            x = per_frame(stage.up, x)                                  # (B, T, C, H_{k-1}, W_{k-1})
        return per_frame(self.head, x)                                  # (B, T, C_frame, H, W)
