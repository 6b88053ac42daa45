"""Forecaster of the encoder-forecaster (Shi et al. 2015, §3.3).

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


class Forecaster(nn.Module):
    """Encoder states (bottom first) -> (B, T_out, C, H, W) frames."""

    def __init__(self, preset: Preset):
        super().__init__()
        # Stored top first, the order they run in.
        self.stages = nn.ModuleList(ForecasterStage(preset, k)
                                    for k in reversed(range(len(preset.stages))))
        last = len(preset.head) - 1
        self.head = nn.Sequential(*(conv_block(spec, activation=i < last)
                                    for i, spec in enumerate(preset.head)))

    def forward(self, states: list, frames_output: int) -> torch.Tensor:
        x = None  # the top cell has no input
        for stage, state in zip(self.stages, reversed(states)):
            x, _ = run_cell(stage.cell, x, state, steps=frames_output)  # (B, T, hidden_k, H_k, W_k)
            x = per_frame(stage.up, x)                                  # (B, T, C, H_{k-1}, W_{k-1})
        return per_frame(self.head, x)                                  # (B, T, C_frame, H, W)
