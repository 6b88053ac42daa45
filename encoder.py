"""Encoder of the encoder-forecaster (Shi et al. 2015, §3.3): down block, then a cell, per stage."""

from __future__ import annotations

import torch
from torch import nn

from ConvRNN import make_cell, run_cell
from net_params import Conv, Preset


def conv_block(spec: Conv, activation: bool = True) -> nn.Sequential:
    """Conv2d (or ConvTranspose2d) from a net_params.Conv, then LeakyReLU(0.2) unless
    ``activation=False``. The conv is always layer 0, so its keys are ``0.weight``/``0.bias``."""
    if spec.transposed:
        # (kernel - stride) / 2 padding makes the output exactly stride times the input.
        conv = nn.ConvTranspose2d(spec.in_channels, spec.out_channels, spec.kernel,
                                  stride=spec.stride, padding=(spec.kernel - spec.stride) // 2)
    else:
        conv = nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel,
                         stride=spec.stride, padding=spec.kernel // 2)
    layers = [conv]
    if activation:
        layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


def per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D module to every frame at once: (B, T, C, H, W) -> (B, T, C', H', W')."""
    B, T = x.shape[:2]
    return module(x.flatten(0, 1)).unflatten(0, (B, T))  # via (B*T, C, H, W)


class EncoderStage(nn.Module):
    def __init__(self, preset: Preset, index: int):
        super().__init__()
        stage = preset.stages[index]
        self.down = conv_block(stage.down)
        self.cell = make_cell(preset.cell, stage.down.out_channels, stage.hidden,
                              preset.cell_kernel, norm=preset.norm, **preset.cell_options)


class Encoder(nn.Module):
    """(B, T_in, C, H, W) -> one last state per stage, bottom stage first."""

    def __init__(self, preset: Preset):
        super().__init__()
        self.stages = nn.ModuleList(EncoderStage(preset, k) for k in range(len(preset.stages)))

    def forward(self, x: torch.Tensor) -> list:
        states = []
        for stage in self.stages:
            x = per_frame(stage.down, x)         # (B, T, C_k, H_k, W_k)
            x, state = run_cell(stage.cell, x)   # (B, T, hidden_k, H_k, W_k)
            states.append(state)
        return states
