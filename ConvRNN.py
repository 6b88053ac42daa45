"""Convolutional recurrent cells and the one loop that runs them over time.

Every cell has one interface (state in, state out):

    output, state = cell(x, state)

* ``x`` is (B, C_in, H, W), or ``None`` for "no input". With ``None`` the input
  convolution is skipped, not run over zeros. A cell built with ``input_channels=0``
  has no input convolution at all (the forecaster's top stage).
* ``state`` is ``None`` for zeros, or what the cell returned before. A zero state is
  never materialised: a convolution of zeros is just its bias, so it is skipped too.
  The result equals an explicit zero state exactly, on the weights' device and dtype.
* Kernels are odd with 'same' padding, so a cell keeps H and W.

Splitting the textbook convolution of cat(x, h) into an input part and a state part lets
`run_cell` compute the input part for all T steps in ONE batched convolution
(``cell.project_input``), because it does not depend on the recurrence. Only the state
part carries a bias, so the split adds no second bias and the parameter count equals the
cat(x, h) form.
"""

from __future__ import annotations

import torch
from torch import nn

State = torch.Tensor | tuple[torch.Tensor, ...]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with about 32 channels a group, as the original repo, for any channel count.

    The original used ``GroupNorm(C // 32, C)``, which crashes below 32 channels and for
    counts that 32 does not divide; we take the largest group count <= C // 32 (at least
    1) that divides C, which equals the original wherever the original worked.
    """
    groups = max(1, channels // 32)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def _norm(norm: str | None, channels: int) -> nn.Module:
    if norm in (None, "none"):
        return nn.Identity()
    if norm == "group":
        return group_norm(channels)
    raise ValueError(f"unknown norm {norm!r}; use 'group' or None")


def _check_kernel(kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"cell kernel_size must be odd for 'same' padding, got {kernel_size}; use 3 or 5"
        )


class ConvRNNCell(nn.Module):
    """Shared plumbing: the bias-free input convolution and the step/forward split.

    Subclasses set ``input_conv`` output channels via ``projection_channels`` and
    implement ``step(x_proj, state)``, where ``x_proj`` is ``project_input(x)`` or None.
    """

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: int,
                 projection_channels: int, *, input_kernel_size: int | None = None):
        super().__init__()
        _check_kernel(kernel_size)
        input_kernel_size = kernel_size if input_kernel_size is None else input_kernel_size
        _check_kernel(input_kernel_size)
        if input_channels < 0 or hidden_channels < 1:
            raise ValueError(
                f"need input_channels >= 0 and hidden_channels >= 1, "
                f"got {input_channels} and {hidden_channels}"
            )
        self.input_channels = input_channels
        self.hidden_channels = hidden_channels
        self.kernel_size = kernel_size
        # No bias here: the state convolution owns the one bias of cat(x, h) * W + b.
        self.input_conv = (
            nn.Conv2d(input_channels, projection_channels, input_kernel_size,
                      padding=input_kernel_size // 2, bias=False)
            if input_channels > 0 else None
        )

    def project_input(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, projection_channels, H, W); N may be B*T."""
        if self.input_conv is None:
            raise ValueError(
                f"{type(self).__name__} was built with input_channels=0 and takes no input; "
                "pass x=None"
            )
        if x.dim() != 4 or x.shape[1] != self.input_channels:
            raise ValueError(
                f"{type(self).__name__} expects input (N, {self.input_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        return self.input_conv(x)

    def forward(self, x: torch.Tensor | None, state: State | None = None):
        x_proj = None if x is None else self.project_input(x)
        return self.step(x_proj, state)

    def step(self, x_proj: torch.Tensor | None, state: State | None):
        raise NotImplementedError

    @staticmethod
    def _need_shape(x_proj, state) -> None:
        if x_proj is None and state is None:
            raise ValueError("a cell step needs an input or a state to know (B, H, W); "
                             "got x=None and state=None")

    def extra_repr(self) -> str:
        return (f"input_channels={self.input_channels}, "
                f"hidden_channels={self.hidden_channels}, kernel_size={self.kernel_size}")


class ConvLSTMCell(ConvRNNCell):
    """ConvLSTM of Shi et al. 2015 (arXiv 1506.04214), eq. 3.

        i = σ(W_xi*X + W_hi*H + W_ci∘C_{t-1} + b_i)
        f = σ(W_xf*X + W_hf*H + W_cf∘C_{t-1} + b_f)
        C_t = f∘C_{t-1} + i∘tanh(W_xc*X + W_hc*H + b_c)
        o = σ(W_xo*X + W_ho*H + W_co∘C_t + b_o)
        H_t = o∘tanh(C_t)

    x: (B, C_in, H, W) or None; state: (h, c), each (B, C_hid, H, W), or None.
    Returns (h, (h, c)).

    ``peephole=True`` adds the W_c∘C terms. The peephole weight has shape
    (3, C_hid, 1, 1): one weight per channel for i, f and o, broadcast over space. The
    paper writes a full Hadamard product, which would tie the cell to one image size and
    break the translation equivariance the convolutions give; a per-channel weight keeps
    the cell fully convolutional. ``norm="group"`` applies GroupNorm to the four gate
    pre-activations together, as the original repo does (before the peephole terms).
    """

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: int, *,
                 peephole: bool = False, norm: str | None = None):
        super().__init__(input_channels, hidden_channels, kernel_size, 4 * hidden_channels)
        self.hidden_conv = nn.Conv2d(hidden_channels, 4 * hidden_channels, kernel_size,
                                     padding=kernel_size // 2)
        self.norm = _norm(norm, 4 * hidden_channels)
        self.peephole = (nn.Parameter(torch.zeros(3, hidden_channels, 1, 1))
                         if peephole else None)

    def step(self, x_proj, state):
        self._need_shape(x_proj, state)
        if state is None:  # H = C = 0: W_h*H is just the bias and C_{t-1} drops out
            h_prev = c_prev = None
            gates = x_proj + self.hidden_conv.bias.view(1, -1, 1, 1)
        else:
            h_prev, c_prev = state
            gates = self.hidden_conv(h_prev)
            if x_proj is not None:
                gates = gates + x_proj
        i, f, g, o = self.norm(gates).chunk(4, dim=1)  # each (B, C_hid, H, W)
        if self.peephole is not None and c_prev is not None:
            i = i + self.peephole[0] * c_prev
            f = f + self.peephole[1] * c_prev
        i, g = torch.sigmoid(i), torch.tanh(g)
        c = i * g if c_prev is None else torch.sigmoid(f) * c_prev + i * g
        if self.peephole is not None:
            o = o + self.peephole[2] * c  # the output gate peeks at C_t, not C_{t-1}
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)


class ConvGRUCell(ConvRNNCell):
    """Convolutional GRU: reset gate r, update gate z, candidate n.

        z = σ(W_xz*X + W_hz*H + b_z)
        r = σ(W_xr*X + W_hr*H + b_r)
        n = tanh(W_xn*X + W_hn*(r∘H) + b_n)
        H_t = (1 − z)∘n + z∘H_{t-1}

    z is the share of the OLD state that is kept, as in torch.nn.GRU and TrajGRU
    (Shi et al. 2017); the original repo wrote the mirror image, (1 − z)∘H + z∘n.

    x: (B, C_in, H, W) or None; state: h (B, C_hid, H, W) or None. Returns (h, h).
    ``norm="group"`` applies GroupNorm to the (z, r) pre-activations and to the candidate
    pre-activation, as the original repo does.
    """

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: int, *,
                 norm: str | None = None):
        # The input projection holds (z, r | n): 3 * C_hid channels in one convolution.
        super().__init__(input_channels, hidden_channels, kernel_size, 3 * hidden_channels)
        pad = kernel_size // 2
        self.gate_conv = nn.Conv2d(hidden_channels, 2 * hidden_channels, kernel_size, padding=pad)
        self.candidate_conv = nn.Conv2d(hidden_channels, hidden_channels, kernel_size, padding=pad)
        self.gate_norm = _norm(norm, 2 * hidden_channels)
        self.candidate_norm = _norm(norm, hidden_channels)

    def step(self, x_proj, state):
        self._need_shape(x_proj, state)
        C = self.hidden_channels
        x_gates = x_cand = None
        if x_proj is not None:
            x_gates, x_cand = x_proj[:, :2 * C], x_proj[:, 2 * C:]
        if state is None:  # H = 0: both state convolutions reduce to their biases
            gates = x_gates + self.gate_conv.bias.view(1, -1, 1, 1)
            cand = x_cand + self.candidate_conv.bias.view(1, -1, 1, 1)
        else:
            gates = self.gate_conv(state)
            if x_gates is not None:
                gates = gates + x_gates
        z, r = torch.sigmoid(self.gate_norm(gates)).chunk(2, dim=1)  # each (B, C_hid, H, W)
        if state is not None:
            cand = self.candidate_conv(r * state)
            if x_cand is not None:
                cand = cand + x_cand
        n = torch.tanh(self.candidate_norm(cand))
        h = (1 - z) * n if state is None else (1 - z) * n + z * state
        return h, h


CELLS: dict[str, type[ConvRNNCell]] = {
    "convlstm": ConvLSTMCell,
    "convgru": ConvGRUCell,
}


def run_cell(cell: ConvRNNCell, inputs: torch.Tensor | None = None,
             state: State | None = None, steps: int | None = None):
    """Run ``cell`` over time. Batch-major, like the model: time is dim 1.

    inputs: (B, T, C_in, H, W), or None for T = ``steps`` steps without input.
    state:  the initial state, or None for zeros.
    Returns (outputs (B, T, C_hid, H, W), last state).

    The input-to-state convolution of all T steps runs as ONE convolution over the B*T
    frames; only the state-to-state part stays inside the loop.
    """
    if inputs is None:
        if steps is None or steps < 1:
            raise ValueError(f"run_cell without inputs needs steps >= 1, got {steps}")
        projections = [None] * steps
    else:
        if inputs.dim() != 5:
            raise ValueError(f"run_cell expects inputs (B, T, C, H, W), got {tuple(inputs.shape)}")
        B, T = inputs.shape[:2]
        if steps is not None and steps != T:
            raise ValueError(f"steps={steps} but inputs hold T={T} frames")
        projected = cell.project_input(inputs.flatten(0, 1))  # (B*T, G, H, W)
        projections = projected.unflatten(0, (B, T)).unbind(1)  # T x (B, G, H, W)
    outputs = []
    for x_proj in projections:
        out, state = cell.step(x_proj, state)
        outputs.append(out)
    return torch.stack(outputs, dim=1), state  # (B, T, C_hid, H, W)


def make_cell(name: str, input_channels: int, hidden_channels: int, kernel_size: int,
              **options) -> ConvRNNCell:
    """Build a cell by its preset name ('convlstm', 'convgru', ...)."""
    if name not in CELLS:
        raise ValueError(f"unknown cell {name!r}; known cells: {', '.join(sorted(CELLS))}")
    return CELLS[name](input_channels, hidden_channels, kernel_size, **options)
