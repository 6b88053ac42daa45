"""The original repo's model (jhhuang96/ConvLSTM-PyTorch), transcribed for the tests.

Written from the original's documented architecture and its published net_params, not
from this repo's modules, so that tests/test_convert_original.py compares the converter's
output against an independent model. Module names are the original's, so ``state_dict()``
has the keys and shapes of its checkpoints:

* ``ED(encoder, decoder)``; every conv stage is an ``nn.Sequential`` whose layers are
  named after net_params' keys (``conv1_leaky_1``, ...), each followed by LeakyReLU(0.2),
  the decoder's very last layer (``stage1.conv4_leaky_1``) included;
* cells convolve ``cat(x, h)``, input channels first. ``CLSTM_cell``: one conv with
  GroupNorm(4C // 32), gates (i, f, g, o), no peepholes. ``CGRU_cell``: ``conv1`` makes
  (z, r), ``conv2`` runs over ``cat(x, r·h)``, and h' = (1 − z)·h + z·tanh(...): z is the
  share of the NEW candidate;
* the encoder runs stage1 -> rnn1 -> stage2 -> rnn2 -> stage3 -> rnn3, each cell from a
  zero state; the decoder runs rnn3 -> stage3 -> rnn2 -> stage2 -> rnn1 -> stage1, each
  cell from the state of the encoder cell with the same number, and feeds rnn3 zeros of
  96 channels.

Unlike the original, which is sequence-major inside, this takes and returns batch-major
(B, T, C, H, W) frames, like model.EncoderForecaster.
"""

from collections import OrderedDict

import torch
from torch import nn

# The published net_params, stage by stage: layer name -> [in, out, kernel, stride, padding].
ENCODER_STAGES = [
    OrderedDict(conv1_leaky_1=[1, 16, 3, 1, 1]),
    OrderedDict(conv2_leaky_1=[64, 64, 3, 2, 1]),
    OrderedDict(conv3_leaky_1=[96, 96, 3, 2, 1]),
]
ENCODER_CELLS = [(16, 64), (64, 96), (96, 96)]  # rnn1..rnn3: (input channels, hidden)
# The decoder's lists run in its order; entry k is named stage{3 - k} and rnn{3 - k}.
DECODER_STAGES = [
    OrderedDict(deconv1_leaky_1=[96, 96, 4, 2, 1]),
    OrderedDict(deconv2_leaky_1=[96, 96, 4, 2, 1]),
    OrderedDict(conv3_leaky_1=[64, 16, 3, 1, 1], conv4_leaky_1=[16, 1, 1, 1, 0]),
]
DECODER_CELLS = [(96, 96), (96, 96), (96, 64)]  # rnn3, rnn2, rnn1
KERNEL = 5


def make_stage(layers: OrderedDict) -> nn.Sequential:
    modules = OrderedDict()
    for name, (c_in, c_out, k, stride, pad) in layers.items():
        conv = nn.ConvTranspose2d if name.startswith("deconv") else nn.Conv2d
        modules[name] = conv(c_in, c_out, k, stride=stride, padding=pad)
        modules["leaky_" + name] = nn.LeakyReLU(0.2)
    return nn.Sequential(modules)


def conv_norm(c_in: int, c_out: int, norm: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, KERNEL, padding=KERNEL // 2)]
    if norm:
        layers.append(nn.GroupNorm(c_out // 32, c_out))
    return nn.Sequential(*layers)


class CLSTM_cell(nn.Module):
    def __init__(self, input_channels: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.conv = conv_norm(input_channels + hidden, 4 * hidden)

    def zero_state(self, like: torch.Tensor):
        h = like.new_zeros(like.shape[0], self.hidden, *like.shape[2:])
        return h, h.clone()

    def forward(self, x, state):
        h, c = state
        i, f, g, o = torch.split(self.conv(torch.cat((x, h), 1)), self.hidden, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)


class CGRU_cell(nn.Module):
    def __init__(self, input_channels: int, hidden: int, norm: bool = True):
        super().__init__()
        self.hidden = hidden
        self.conv1 = conv_norm(input_channels + hidden, 2 * hidden, norm)
        self.conv2 = conv_norm(input_channels + hidden, hidden, norm)

    def zero_state(self, like: torch.Tensor):
        return like.new_zeros(like.shape[0], self.hidden, *like.shape[2:])

    def forward(self, x, h):
        z, r = torch.split(torch.sigmoid(self.conv1(torch.cat((x, h), 1))), self.hidden, dim=1)
        candidate = torch.tanh(self.conv2(torch.cat((x, r * h), 1)))
        h = (1 - z) * h + z * candidate  # z: the share of the new candidate
        return h, h


CELL_TYPES = {"convlstm": CLSTM_cell, "convgru": CGRU_cell}


def per_frame(module, x):
    """(B, T, C, H, W) -> (B, T, C', H', W') through a 2-D module."""
    B, T = x.shape[:2]
    y = module(x.reshape(B * T, *x.shape[2:]))  # (B*T, C', H', W')
    return y.reshape(B, T, *y.shape[1:])


def run(cell, x, state):
    """x (B, T, C_in, H, W) from ``state`` -> (outputs (B, T, C_hid, H, W), last state)."""
    outputs = []
    for t in range(x.shape[1]):
        out, state = cell(x[:, t], state)
        outputs.append(out)
    return torch.stack(outputs, 1), state


class Encoder(nn.Module):
    def __init__(self, cell_type):
        super().__init__()
        for k, (layers, (c_in, hidden)) in enumerate(zip(ENCODER_STAGES, ENCODER_CELLS), 1):
            setattr(self, f"stage{k}", make_stage(layers))
            setattr(self, f"rnn{k}", cell_type(c_in, hidden))

    def forward(self, x):
        states = []
        for k in range(1, len(ENCODER_STAGES) + 1):
            x = per_frame(getattr(self, f"stage{k}"), x)
            rnn = getattr(self, f"rnn{k}")
            x, state = run(rnn, x, rnn.zero_state(x[:, 0]))
            states.append(state)
        return states  # rnn1's first


class Decoder(nn.Module):
    def __init__(self, cell_type):
        super().__init__()
        n = len(DECODER_STAGES)
        for k, (layers, (c_in, hidden)) in enumerate(zip(DECODER_STAGES, DECODER_CELLS)):
            setattr(self, f"rnn{n - k}", cell_type(c_in, hidden))
            setattr(self, f"stage{n - k}", make_stage(layers))

    def forward(self, states, frames_output):
        n = len(DECODER_STAGES)
        h3 = states[-1][0] if isinstance(states[-1], tuple) else states[-1]
        B, _, H, W = h3.shape
        x = h3.new_zeros(B, frames_output, DECODER_CELLS[0][0], H, W)  # rnn3's input: zeros
        for k in range(n, 0, -1):
            x, _ = run(getattr(self, f"rnn{k}"), x, states[k - 1])
            x = per_frame(getattr(self, f"stage{k}"), x)
        return x


class ED(nn.Module):
    """(B, T_in, 1, H, W) -> (B, frames_output, 1, H, W); H and W divisible by 4."""

    def __init__(self, arch: str):
        super().__init__()
        self.encoder = Encoder(CELL_TYPES[arch])
        self.decoder = Decoder(CELL_TYPES[arch])

    def forward(self, x, frames_output):
        return self.decoder(self.encoder(x), frames_output)
