"""Convolutional recurrent cells, the one loop that runs them over time, and layers over
sequences shaped like torch.nn.LSTM (ConvLSTM, ConvGRU, TrajGRU). Needs only torch.

Every cell has one interface (state in, state out):

    output, state = cell(x, state)

* ``x`` is (B, C_in, H, W), or ``None`` for "no input". With ``None`` the input
  convolution is skipped, not run over zeros. A cell built with ``input_channels=0``
  has no input convolution at all (the forecaster's top stage).
* ``state`` is ``None`` for zeros, or what the cell returned before. A zero state is
  never materialised: a convolution of zeros is just its bias, so it is skipped too.
  The result equals an explicit zero state exactly, on the weights' device and dtype.
* Kernels are odd, an int or a (kh, kw) pair, with 'same' padding: a cell keeps H and W.

Splitting the textbook convolution of cat(x, h) into an input part and a state part lets
`run_cell` compute the input part for all T steps in ONE batched convolution
(``cell.project_input``), because it does not depend on the recurrence. In ConvLSTM and
ConvGRU only the state part carries a bias, so the split adds no second bias and the
parameter count equals the cat(x, h) form. TrajGRU is the exception: its candidate has an
input-side bias that the reset gate does not multiply (see TrajGRUCell).

Under autocast (bf16/fp16) the convolutions, and so the gate pre-activations, run in the
low precision from the first step on. What accumulates over time (the LSTM's memory C,
the GRU's H) stays in the weights' dtype (fp32); the LSTM's H, which only convolutions
read, comes out in their dtype. So a state has the same dtypes at every step.
Channels_last frames stay channels_last through `run_cell` (see `unbind_time`).

With few input channels that batched convolution is a poor fit for oneDNN on the CPU, so
`run_cell(..., fused=True)` can instead convolve cat(x, h) once per step, the textbook
form, with the same parameters (``cell.fused_stepper``). The layers pick per layer
(``input_conv``); docs/api.md describes them.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

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


def norm_layer(norm: str | None, channels: int) -> nn.Module:
    """The normalisation a cell applies to ``channels`` pre-activations: None (or "none") is
    the identity, "group" is `group_norm`."""
    if norm in (None, "none"):
        return nn.Identity()
    if norm == "group":
        return group_norm(channels)
    raise ValueError(f"unknown norm {norm!r}; use 'group' or None")


Kernel = int | tuple[int, int]


def kernel_pair(kernel_size: Kernel) -> tuple[int, int]:
    """An odd int k or an odd (kh, kw) pair -> (kh, kw); 'same' padding needs odd sizes."""
    try:
        pair = (operator.index(kernel_size),) * 2
    except TypeError:
        try:
            pair = tuple(operator.index(k) for k in kernel_size)
        except TypeError:
            pair = ()
    if len(pair) != 2 or min(pair) < 1 or pair[0] % 2 == 0 or pair[1] % 2 == 0:
        raise ValueError(
            f"cell kernel_size must be odd for 'same' padding, got {kernel_size!r}; "
            "use 3 or 5, or an odd (kh, kw) pair such as (3, 5)"
        )
    return pair


def conv2d(in_channels: int, out_channels: int, kernel_size: Kernel,
           bias: bool = True) -> nn.Conv2d:
    """A stride-1 convolution with 'same' padding (odd kernels), as every cell uses."""
    kh, kw = kernel_pair(kernel_size)
    return nn.Conv2d(in_channels, out_channels, (kh, kw), padding=(kh // 2, kw // 2), bias=bias)


class ConvRNNCell(nn.Module):
    """Shared plumbing: the bias-free input convolution and the step/forward split.

    Subclasses set ``input_conv`` output channels via ``projection_channels`` and
    implement ``step(x_proj, state)``, where ``x_proj`` is ``project_input(x)`` or None.
    A kernel is an odd int or an odd (kh, kw) pair; ``kernel_size`` keeps what was given.
    """

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: Kernel,
                 projection_channels: int, *, input_kernel_size: Kernel | None = None):
        super().__init__()
        kernel_pair(kernel_size)
        input_kernel_size = kernel_size if input_kernel_size is None else input_kernel_size
        kernel_pair(input_kernel_size)
        if input_channels < 0 or hidden_channels < 1:
            raise ValueError(
                f"need input_channels >= 0 and hidden_channels >= 1, "
                f"got {input_channels} and {hidden_channels}"
            )
        self.input_channels = input_channels
        self.hidden_channels = hidden_channels
        self.kernel_size = (tuple(kernel_size) if isinstance(kernel_size, (tuple, list))
                            else kernel_size)
        # No bias here: the state convolution owns the one bias of cat(x, h) * W + b.
        self.input_conv = (
            conv2d(input_channels, projection_channels, input_kernel_size, bias=False)
            if input_channels > 0 else None
        )

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear ValueError unless x is (N, C_in, H, W) for a cell that takes input."""
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

    def project_input(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, projection_channels, H, W); N may be B*T."""
        self.check_input(x)
        return self.input_conv(x)

    def forward(self, x: torch.Tensor | None, state: State | None = None):
        x_proj = None if x is None else self.project_input(x)
        return self.step(x_proj, state)

    def step(self, x_proj: torch.Tensor | None, state: State | None):
        raise NotImplementedError

    def fused_stepper(self):
        """A step ``(x, state) -> (output, state)`` that convolves the frame x (B, C_in, H, W)
        inside the step instead of taking a projection computed beforehand.

        Where a cell's equations allow, its override runs ONE convolution over cat(x, h)
        with the input and state weights concatenated (same parameters, same math; the
        textbook form), which suits small C_in better than a batched input convolution.
        The concatenated weights are made once here, so build one stepper per sequence.
        The zero first state still skips the state convolution. This default just
        projects x per step.
        """
        def step(x, state):
            return self.step(self.project_input(x), state)
        return step

    @staticmethod
    def _need_shape(x_proj, state) -> None:
        if x_proj is None and state is None:
            raise ValueError("a cell step needs an input or a state to know (B, H, W); "
                             "got x=None and state=None")

    def extra_repr(self) -> str:
        return (f"input_channels={self.input_channels}, "
                f"hidden_channels={self.hidden_channels}, kernel_size={self.kernel_size}")


def _conv_cat(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
              conv: nn.Conv2d) -> torch.Tensor:
    """cat(x, h) * weight + conv.bias with conv's padding: the fused step's one convolution."""
    return F.conv2d(torch.cat([x, h], dim=1), weight, conv.bias, padding=conv.padding)


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

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: Kernel, *,
                 peephole: bool = False, norm: str | None = None):
        super().__init__(input_channels, hidden_channels, kernel_size, 4 * hidden_channels)
        self.hidden_conv = conv2d(hidden_channels, 4 * hidden_channels, kernel_size)
        self.norm = norm_layer(norm, 4 * hidden_channels)
        self.peephole = (nn.Parameter(torch.zeros(3, hidden_channels, 1, 1))
                         if peephole else None)

    def step(self, x_proj, state):
        self._need_shape(x_proj, state)
        if state is None:  # H = C = 0: W_h*H is just the bias and C_{t-1} drops out
            # in the conv's dtype, as every later step's gates (bf16 under autocast)
            gates = x_proj + self.hidden_conv.bias.view(1, -1, 1, 1).to(x_proj.dtype)
            return self._update(gates, None)
        h_prev, c_prev = state
        gates = self.hidden_conv(h_prev)
        if x_proj is not None:
            gates = gates + x_proj
        return self._update(gates, c_prev)

    def fused_stepper(self):
        if self.input_conv is None:
            return super().fused_stepper()
        weight = torch.cat([self.input_conv.weight, self.hidden_conv.weight], dim=1)

        def step(x, state):
            if state is None:
                return self.step(self.project_input(x), None)
            h_prev, c_prev = state
            return self._update(_conv_cat(x, h_prev, weight, self.hidden_conv), c_prev)
        return step

    def _update(self, gates, c_prev):
        """Eq. 3 from the summed pre-activations (B, 4*C_hid, H, W) on; c_prev None is zero."""
        i, f, g, o = self.norm(gates).chunk(4, dim=1)  # each (B, C_hid, H, W)
        if self.peephole is not None and c_prev is not None:
            i = i + self.peephole[0] * c_prev
            f = f + self.peephole[1] * c_prev
        i, g = torch.sigmoid(i), torch.tanh(g)
        if c_prev is None:  # C accumulates over time: keep it in the weights' dtype
            c = (i * g).to(self.hidden_conv.weight.dtype)
        else:
            c = torch.sigmoid(f) * c_prev + i * g
        if self.peephole is not None:
            o = o + self.peephole[2] * c  # the output gate peeks at C_t, not C_{t-1}
        # Only convolutions read H: hand it over in their dtype, not a copy per reader.
        h = (torch.sigmoid(o) * torch.tanh(c)).to(gates.dtype)
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

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: Kernel, *,
                 norm: str | None = None):
        # The input projection holds (z, r | n): 3 * C_hid channels in one convolution.
        super().__init__(input_channels, hidden_channels, kernel_size, 3 * hidden_channels)
        self.gate_conv = conv2d(hidden_channels, 2 * hidden_channels, kernel_size)
        self.candidate_conv = conv2d(hidden_channels, hidden_channels, kernel_size)
        self.gate_norm = norm_layer(norm, 2 * hidden_channels)
        self.candidate_norm = norm_layer(norm, hidden_channels)

    def step(self, x_proj, state):
        self._need_shape(x_proj, state)
        C = self.hidden_channels
        x_gates = x_cand = None
        if x_proj is not None:
            x_gates, x_cand = x_proj[:, :2 * C], x_proj[:, 2 * C:]
        if state is None:  # H = 0: both state convolutions reduce to their biases
            # in the conv's dtype, as every later step's pre-activations (bf16 under autocast)
            gates = x_gates + self.gate_conv.bias.view(1, -1, 1, 1).to(x_gates.dtype)
            z, _ = torch.sigmoid(self.gate_norm(gates)).chunk(2, dim=1)  # r multiplies H = 0
            cand = x_cand + self.candidate_conv.bias.view(1, -1, 1, 1).to(x_cand.dtype)
            return self._update(z, cand, None)
        gates = self.gate_conv(state)
        if x_gates is not None:
            gates = gates + x_gates
        z, r = torch.sigmoid(self.gate_norm(gates)).chunk(2, dim=1)  # each (B, C_hid, H, W)
        cand = self.candidate_conv(r * state)
        if x_cand is not None:
            cand = cand + x_cand
        return self._update(z, cand, state)

    def fused_stepper(self):
        if self.input_conv is None:
            return super().fused_stepper()
        C = self.hidden_channels
        w_x = self.input_conv.weight
        w_gate = torch.cat([w_x[:2 * C], self.gate_conv.weight], dim=1)
        w_cand = torch.cat([w_x[2 * C:], self.candidate_conv.weight], dim=1)

        def step(x, state):
            if state is None:
                return self.step(self.project_input(x), None)
            gates = _conv_cat(x, state, w_gate, self.gate_conv)
            z, r = torch.sigmoid(self.gate_norm(gates)).chunk(2, dim=1)
            return self._update(z, _conv_cat(x, r * state, w_cand, self.candidate_conv), state)
        return step

    def _update(self, z, cand, state):
        """H_t from z and the candidate's pre-activation; state None is H = 0."""
        n = torch.tanh(self.candidate_norm(cand))
        if state is None:  # H accumulates over time: keep it in the weights' dtype
            h = ((1 - z) * n).to(self.gate_conv.weight.dtype)
        else:
            h = (1 - z) * n + z * state
        return h, h


class TrajGRUCell(ConvRNNCell):
    """TrajGRU of Shi et al. 2017, "Deep learning for precipitation nowcasting: a benchmark
    and a new model" (NeurIPS), §3 and its official MXNet code (sxjscience/HKO-7).

    A ConvGRU whose state-to-state connections follow L learned flow fields instead of a
    fixed kernel. Per step, with H = H_{t-1}:

        F = conv_k(leaky(conv_k(X) + conv_k(H), 0.2))      # flow generator, 2L channels
        (U_l, V_l) = F[2l], F[2l + 1]                      # l = 1..L, in pixels
        W_l(H)(y, x) = H(y − V_l(y, x), x − U_l(y, x))     # bilinear warp, zeros outside
        h2h_r, h2h_z, h2h_h = conv_1x1(cat_l W_l(H))       # with a bias
        i2h_r, i2h_z, i2h_h = conv_3x3(X)                  # bias-free
        r = σ(i2h_r + h2h_r);  z = σ(i2h_z + h2h_z)
        H' = leaky(i2h_h + b_h + r∘h2h_h, 0.2)
        H_t = (1 − z)∘H' + z∘H

    Flows are in pixels and say where the content MOVES: a constant flow (U, V) = (dx, dy)
    shifts the state dx pixels right and dy down, like torch.roll(H, (dy, dx)). The
    official code samples at p − F too (GridGenerator(-flow)). z is the share of the OLD
    state that is kept, as in the paper and in ConvGRUCell here.

    Kernels: ``kernel_size`` (the preset's cell_kernel) sets the three convolutions of the
    flow generator, 5×5 in the paper. The input-to-state convolution is 3×3
    (``input_kernel_size``) and the state-to-state one 1×1 over the warped maps, as in
    the paper. The last flow convolution starts at zero, so training starts from zero
    flow (every link is the identity warp), as the official code does.

    Biases: in the official code both i2h and h2h carry a bias. For r and z, and for the flow
    generator's first layer, the two biases just add up, so one is enough and it sits in the
    state branch (the H→32 flow conv and the 1×1 h2h conv). For the candidate they differ:
    the reset gate multiplies h2h's bias but not i2h's, so i2h's is a parameter of its own,
    ``candidate_input_bias`` = b_h, (C_hid,). It exists only with an input
    (input_channels > 0) and starts at zero. It belongs to the input side but does not
    vanish with x=None, which means a zero input: i2h of zeros is b_h. Checkpoints saved
    before it existed load with b_h = 0, which is the cell they were trained as.

    ``project_input`` computes BOTH input-only convolutions (i2h and the X→32 flow branch)
    in one call, so `run_cell` batches them over all T frames.

    x: (B, C_in, H, W) or None; state: h (B, C_hid, H, W) or None. Returns (h, h).
    With state=None the flow generator is skipped: every warp of a zero state is zero,
    whatever the flows. ``norm`` is not in the paper (the ``trajgru`` preset uses None);
    "group" applies GroupNorm to the (r, z) pre-activations and to the candidate's.
    """

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: Kernel, *,
                 links: int = 13, norm: str | None = None, flow_channels: int = 32,
                 input_kernel_size: Kernel = 3):
        if links < 1 or flow_channels < 1:
            raise ValueError(f"TrajGRU needs links >= 1 and flow_channels >= 1, "
                             f"got links={links} and flow_channels={flow_channels}")
        # input_conv is i2h: (r, z, h), 3 * C_hid channels, bias-free.
        super().__init__(input_channels, hidden_channels, kernel_size, 3 * hidden_channels,
                         input_kernel_size=input_kernel_size)
        self.links = links
        self.flow_input_conv = (
            conv2d(input_channels, flow_channels, kernel_size, bias=False)
            if input_channels > 0 else None
        )
        self.flow_hidden_conv = conv2d(hidden_channels, flow_channels, kernel_size)
        self.flow_out_conv = conv2d(flow_channels, 2 * links, kernel_size)
        nn.init.zeros_(self.flow_out_conv.weight)
        nn.init.zeros_(self.flow_out_conv.bias)
        self.hidden_conv = nn.Conv2d(links * hidden_channels, 3 * hidden_channels, 1)
        self.candidate_input_bias = (nn.Parameter(torch.zeros(hidden_channels))
                                     if input_channels > 0 else None)
        self.gate_norm = norm_layer(norm, 2 * hidden_channels)
        self.candidate_norm = norm_layer(norm, hidden_channels)
        self._grid_cache: tuple | None = None  # (key, base grid, scale); not a buffer

    def project_input(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, 3*C_hid + flow_channels, H, W): i2h, then the flow input branch."""
        i2h = super().project_input(x)  # also checks x
        return torch.cat([i2h, self.flow_input_conv(x)], dim=1)

    def flows(self, x_flow: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        """Flow generator: (B, 2L, H, W) in pixels, channels (U_1, V_1, ..., U_L, V_L).

        x_flow is the X→32 branch from ``project_input`` (None without input)."""
        f = self.flow_hidden_conv(h)
        if x_flow is not None:
            f = f + x_flow
        return self._flows_from(f)

    def _flows_from(self, f: torch.Tensor) -> torch.Tensor:
        """The flow generator after its first layer's summed pre-activation f (B, 32, H, W)."""
        return self.flow_out_conv(F.leaky_relu(f, 0.2))

    def _base_grid(self, H: int, W: int, device, dtype):
        """The identity grid (H, W, 2) in grid_sample's (x, y) order, and pixels -> [-1, 1].

        align_corners=True: -1 and 1 are the CENTRES of the first and last pixel, so a
        pixel is 2 / (size − 1) normalised units and pixel i sits at −1 + i·2/(size − 1).
        """
        key = (H, W, device, dtype)
        if self._grid_cache is None or self._grid_cache[0] != key:
            ys = torch.linspace(-1, 1, H, device=device, dtype=dtype)
            xs = torch.linspace(-1, 1, W, device=device, dtype=dtype)
            base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2)
            scale = torch.tensor([2 / max(W - 1, 1), 2 / max(H - 1, 1)], device=device, dtype=dtype)
            self._grid_cache = (key, base, scale)
        return self._grid_cache[1:]

    def warp(self, h: torch.Tensor, flows: torch.Tensor) -> torch.Tensor:
        """h (B, C, H, W) warped by each of the L flows -> (B, L*C, H, W), link l at [l*C, (l+1)*C).

        One grid_sample call for all links: the L grids are stacked along the height, so
        h is sampled as it is, not copied L times.
        """
        B, C, H, W = h.shape
        L = self.links
        # Sample positions need more than bfloat16's 8 bits (autocast runs grid_sample in
        # float32 on CUDA anyway); float32 and float64 pass through unchanged.
        dtype = torch.promote_types(h.dtype, torch.float32)
        base, scale = self._base_grid(H, W, flows.device, dtype)
        uv = flows.to(dtype).unflatten(1, (L, 2)).permute(0, 1, 3, 4, 2)  # (B, L, H, W, 2)
        grid = (base - uv * scale).reshape(B, L * H, W, 2)  # sample at p − F: content moves by +F
        warped = F.grid_sample(h.to(dtype), grid, mode="bilinear", padding_mode="zeros",
                               align_corners=True)  # (B, C, L*H, W)
        return warped.unflatten(2, (L, H)).transpose(1, 2).reshape(B, L * C, H, W).to(h.dtype)

    def step(self, x_proj, state):
        self._need_shape(x_proj, state)
        C = self.hidden_channels
        i2h = x_flow = None
        if x_proj is not None:
            i2h, x_flow = x_proj[:, :3 * C], x_proj[:, 3 * C:]
        if state is None:  # H = 0: every warped map is 0, so h2h is just the 1x1 conv's bias
            h2h = self.hidden_conv.bias.view(1, -1, 1, 1)
        else:
            h2h = self.hidden_conv(self.warp(state, self.flows(x_flow, state)))  # (B, 3C, H, W)
        return self._update(i2h, h2h, state)

    def fused_stepper(self):
        """The flow generator's first layer runs as one convolution over cat(x, H); i2h
        (3x3 on x) and h2h (1x1 on the warped H) read different maps and stay apart."""
        if self.input_conv is None:
            return super().fused_stepper()
        w_flow = torch.cat([self.flow_input_conv.weight, self.flow_hidden_conv.weight], dim=1)

        def step(x, state):
            if state is None:
                return self._update(self.input_conv(x), self.hidden_conv.bias.view(1, -1, 1, 1),
                                    None)
            flows = self._flows_from(_conv_cat(x, state, w_flow, self.flow_hidden_conv))
            h2h = self.hidden_conv(self.warp(state, flows))  # (B, 3C, H, W)
            return self._update(self.input_conv(x), h2h, state)
        return step

    def _update(self, i2h, h2h, state):
        """H_t from i2h (B, 3C, H, W) or None and h2h (3C channels); state None is H = 0."""
        C = self.hidden_channels
        gates = h2h[:, :2 * C] if i2h is None else i2h[:, :2 * C] + h2h[:, :2 * C]
        r, z = torch.sigmoid(self.gate_norm(gates)).chunk(2, dim=1)  # each (B, C_hid, H, W)
        cand = r * h2h[:, 2 * C:]
        if i2h is not None:
            cand = cand + i2h[:, 2 * C:]
        if self.candidate_input_bias is not None:  # with x=None too: i2h of zeros is b_h
            cand = cand + self.candidate_input_bias.view(1, -1, 1, 1).to(cand.dtype)
        new = F.leaky_relu(self.candidate_norm(cand), 0.2)
        h = (1 - z) * new if state is None else (1 - z) * new + z * state
        return h, h

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "candidate_input_bias"
        if self.candidate_input_bias is not None and key not in state_dict:
            # A checkpoint from before b_h existed: zero is exactly the cell it was trained
            # as. load_state_dict works on a copy, so the caller's dict is left as it was.
            state_dict[key] = torch.zeros_like(self.candidate_input_bias)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", links={self.links}"


CELLS: dict[str, type[ConvRNNCell]] = {
    "convlstm": ConvLSTMCell,
    "convgru": ConvGRUCell,
    "trajgru": TrajGRUCell,
}


def _channels_last(frame: torch.Tensor) -> bool:
    """Is (B, C, H, W) laid out channels-last (C innermost)? With C == 1 both layouts agree."""
    return frame.shape[1] > 1 and frame.stride(1) == 1 and frame.shape[-1] * frame.shape[-2] > 1


def unbind_time(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, T, C, H, W) -> T views (B, C, H, W), keeping a channels_last layout in backward too.

    A plain ``unbind(1)`` makes autograd stack the T gradients back in the default layout,
    one full layout-converting copy per sequence; unbinding the (B, T, H, W, C) view instead
    keeps every gradient channels_last.
    """
    if _channels_last(x[:, 0]):
        frames = x.permute(0, 1, 3, 4, 2).unbind(1)          # T x (B, H, W, C)
        return tuple(f.permute(0, 3, 1, 2) for f in frames)  # T x (B, C, H, W)
    return x.unbind(1)


def stack_time(frames: list[torch.Tensor]) -> torch.Tensor:
    """T x (B, C, H, W) -> (B, T, C, H, W), channels_last frames staying channels_last.

    torch.stack would write channels_last frames out in the default layout, and the next
    per-frame convolution would convert them back.
    """
    if _channels_last(frames[0]):
        x = torch.stack([f.permute(0, 2, 3, 1) for f in frames], dim=1)  # (B, T, H, W, C)
        return x.permute(0, 1, 4, 2, 3)                                  # (B, T, C, H, W)
    return torch.stack(frames, dim=1)


def run_cell(cell: ConvRNNCell, inputs: torch.Tensor | None = None,
             state: State | None = None, steps: int | None = None, *,
             reverse: bool = False, fused: bool = False):
    """Run ``cell`` over time. Batch-major, like the model: time is dim 1.

    inputs: (B, T, C_in, H, W), or None for T = ``steps`` steps without input.
    state:  the initial state, or None for zeros.
    Returns (outputs (B, T, C_hid, H, W), last state).

    The input-to-state convolution of all T steps runs as ONE convolution over the B*T
    frames; only the state-to-state part stays inside the loop. ``fused=True`` instead
    convolves each frame inside its step, together with the state where the cell can
    (``cell.fused_stepper``): the same function, for shapes where that is faster.
    ``reverse=True`` runs from the last frame to the first (a bidirectional layer's
    backward direction); outputs stay in input order, the state is the one after frame 0.
    """
    if inputs is None:
        if steps is None or steps < 1:
            raise ValueError(f"run_cell without inputs needs steps >= 1, got {steps}")
        items, step = [None] * steps, cell.step
    else:
        if inputs.dim() != 5:
            raise ValueError(f"run_cell expects inputs (B, T, C, H, W), got {tuple(inputs.shape)}")
        B, T = inputs.shape[:2]
        if steps is not None and steps != T:
            raise ValueError(f"steps={steps} but inputs hold T={T} frames")
        if fused:
            cell.check_input(inputs[:, 0])
            items, step = unbind_time(inputs), cell.fused_stepper()  # T x (B, C_in, H, W)
        else:
            projected = cell.project_input(inputs.flatten(0, 1))  # (B*T, G, H, W)
            items, step = unbind_time(projected.unflatten(0, (B, T))), cell.step  # T x (B, G, H, W)
    order = range(len(items) - 1, -1, -1) if reverse else range(len(items))
    outputs = [None] * len(items)
    for t in order:
        outputs[t], state = step(items[t], state)
    return stack_time(outputs), state  # (B, T, C_hid, H, W)


def make_cell(name: str, input_channels: int, hidden_channels: int, kernel_size: Kernel,
              **options) -> ConvRNNCell:
    """Build a cell by its preset name ('convlstm', 'convgru', ...)."""
    if name not in CELLS:
        raise ValueError(f"unknown cell {name!r}; known cells: {', '.join(sorted(CELLS))}")
    return CELLS[name](input_channels, hidden_channels, kernel_size, **options)


# -----------------------------------------------------------------------------
# Layers over sequences, shaped like torch.nn.LSTM

INPUT_CONVS = ("auto", "batched", "fused")
# With input_conv="auto", a layer whose cells take at most this many input channels runs
# the fused step (one convolution over cat(x, h) a frame); wider inputs run the input
# convolution batched over all T frames, as run_cell does. Measured with
# tools/bench_layers.py on a quiet 2-core AVX2 CPU (docs/speed.md), neither strategy won
# beyond the +-10% noise at 1, 8 or 64 input channels, so auto batches everywhere; raise
# this where a measurement on your hardware says fused wins on thin inputs.
FUSE_MAX_INPUT_CHANNELS = 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def cat_channels(sequences: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (B, T, C_k, H, W) sequences along C, channels_last frames staying so."""
    if _channels_last(sequences[0][:, 0]):
        x = torch.cat([s.permute(0, 1, 3, 4, 2) for s in sequences], dim=-1)  # (B, T, H, W, C)
        return x.permute(0, 1, 4, 2, 3)                                      # (B, T, C, H, W)
    return torch.cat(sequences, dim=2)


class ConvRNNLayer(nn.Module):
    """Stacked, optionally bidirectional cells over a sequence, shaped like torch.nn.LSTM.

    ``ConvLSTM``, ``ConvGRU`` and ``TrajGRU`` are this with their cell; docs/api.md maps
    the arguments to torch.nn.LSTM, Keras' ConvLSTM2D and ndrplz/ConvLSTM_pytorch.

    Arguments:
        in_channels: channels of each input frame.
        hidden_channels: one int for every layer, or a list/tuple with one per layer.
        kernel_size: an odd int or an odd (kh, kw) tuple for every layer, or a list with one
            per layer ('same' padding, so H and W are kept; any H and W).
        num_layers: cells stacked; layer l > 0 reads layer l-1's output sequence.
        batch_first: x is (B, T, C, H, W) if True (the default, as the model here), else
            (T, B, C, H, W); output follows x.
        bidirectional: a second cell per layer runs from the last frame to the first; the
            layer's output concatenates both directions' hidden channels, forward first.
        dropout: dropout on each layer's output sequence except the last layer's, in
            training mode only, as torch.nn.LSTM.
        input_conv: "batched" runs each cell's input convolution once over all T frames
            (`run_cell`), "fused" convolves cat(x, h) inside each step with the weights
            concatenated, "auto" (the default) picks per layer by input width
            (``FUSE_MAX_INPUT_CHANNELS``). The parameters and the function are the same.
        **cell_options: the cell's own options (peephole, norm, links, ...).

    ``output, state = layer(x, state=None)``:
        output: (B, T, num_directions * C_hid, H, W), the last layer's hidden sequence
            (C_hid is the last layer's width); (T, B, ...) with batch_first=False.
        state: a list of num_layers * num_directions cell states, layer by layer and,
            inside a layer, forward before backward, as torch.nn.LSTM orders h_n: entry
            ``layer * num_directions + direction`` is the state of
            ``cells[layer * num_directions + direction]`` after its last step (for the
            backward direction, after frame 0). A cell state is the cell's own: (h, c)
            for ConvLSTM, h for ConvGRU and TrajGRU, each (B, C_hid of that layer, H, W).
            It is a list, not one tensor, because widths may differ per layer. Passing it
            back as ``state`` continues the sequence (the forward direction: a backward
            direction would need the later frames first); None, or None entries, are zeros.

    The cells are registered in that same order in ``cells``, each with its own parameters.
    """

    cell_class: type[ConvRNNCell] = ConvRNNCell
    state_tensors = 1  # tensors in one cell's state

    def __init__(self, in_channels: int, hidden_channels: int | Sequence[int],
                 kernel_size: Kernel | list[Kernel], num_layers: int = 1, *,
                 batch_first: bool = True, bidirectional: bool = False, dropout: float = 0.0,
                 input_conv: str = "auto", **cell_options):
        super().__init__()
        name = type(self).__name__
        if not _is_int(num_layers) or num_layers < 1:
            raise ValueError(f"{name}: num_layers must be an int >= 1, got {num_layers!r}")
        if not _is_int(in_channels) or in_channels < 1:
            raise ValueError(f"{name}: in_channels must be an int >= 1, got {in_channels!r}")
        if _is_int(hidden_channels):
            hidden = [hidden_channels] * num_layers
        elif isinstance(hidden_channels, Sequence) and len(hidden_channels) == num_layers:
            hidden = list(hidden_channels)
        else:
            raise ValueError(f"{name}: hidden_channels takes one int or one per layer "
                             f"(num_layers={num_layers}), got {hidden_channels!r}")
        if not all(_is_int(c) and c >= 1 for c in hidden):
            raise ValueError(f"{name}: hidden_channels must be ints >= 1, got {hidden_channels!r}")
        if isinstance(kernel_size, list):
            if len(kernel_size) != num_layers:
                raise ValueError(
                    f"{name}: kernel_size as a list gives one kernel per layer "
                    f"(num_layers={num_layers}), got {len(kernel_size)}: {kernel_size!r}; "
                    "a (kh, kw) kernel for every layer is a tuple")
            kernels = list(kernel_size)
        else:
            kernels = [kernel_size] * num_layers
        for k in kernels:
            try:
                kernel_pair(k)
            except ValueError:
                raise ValueError(
                    f"{name}: kernel_size takes an odd int or an odd (kh, kw) tuple for every "
                    f"layer, or a list with one per layer, got {kernel_size!r}") from None
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0 <= dropout <= 1:
            raise ValueError(f"{name}: dropout must be a probability in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"{name}: dropout={dropout} acts between layers only, so with "
                          "num_layers=1 it does nothing", stacklevel=2)
        if input_conv not in INPUT_CONVS:
            raise ValueError(f"{name}: input_conv must be one of {', '.join(INPUT_CONVS)}, "
                             f"got {input_conv!r}")
        self.in_channels = in_channels
        self.hidden_channels = tuple(hidden)  # per layer
        self.kernel_size = tuple(k if _is_int(k) else tuple(k) for k in kernels)  # per layer
        self.num_layers = num_layers
        self.batch_first = bool(batch_first)
        self.bidirectional = bool(bidirectional)
        self.num_directions = 2 if bidirectional else 1
        self.dropout = float(dropout)
        self.input_conv = input_conv
        self.cells = nn.ModuleList(
            self.cell_class(in_channels if layer == 0 else hidden[layer - 1] * self.num_directions,
                            hidden[layer], kernels[layer], **cell_options)
            for layer in range(num_layers) for _ in range(self.num_directions)
        )

    @property
    def out_channels(self) -> int:
        """Channels of ``output``: num_directions times the last layer's hidden channels."""
        return self.num_directions * self.hidden_channels[-1]

    def fused(self, layer: int) -> bool:
        """Does ``layer`` run the fused step (True) or the batched input convolution?"""
        if self.input_conv == "auto":
            return self.cells[layer * self.num_directions].input_channels \
                <= FUSE_MAX_INPUT_CHANNELS
        return self.input_conv == "fused"

    def forward(self, x: torch.Tensor, state: list | None = None):
        x = self._batch_major(x)                                          # (B, T, C_in, H, W)
        states = self._check_state(state, x)
        last = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            fused = self.fused(layer)
            outputs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                out, s = run_cell(self.cells[k], x, states[k], reverse=direction == 1,
                                  fused=fused)                            # (B, T, C_hid, H, W)
                outputs.append(out)
                last.append(s)
            x = outputs[0] if len(outputs) == 1 else cat_channels(outputs)  # (B, T, D*C_hid, H, W)
        return (x if self.batch_first else x.transpose(0, 1)), last

    def _batch_major(self, x) -> torch.Tensor:
        name = type(self).__name__
        layout = "(B, T, C, H, W)" if self.batch_first else "(T, B, C, H, W)"
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} expects x of shape {layout} "
                             f"(batch_first={self.batch_first}), got {got}")
        if x.shape[2] != self.in_channels:
            raise ValueError(f"{name} expects {self.in_channels} input channels, x {layout} "
                             f"has {x.shape[2]}: got shape {tuple(x.shape)}")
        if 0 in x.shape:
            raise ValueError(f"{name} needs a non-empty x {layout}, got {tuple(x.shape)}")
        return x if self.batch_first else x.transpose(0, 1)                  # (B, T, C, H, W)

    def _check_state(self, state, x: torch.Tensor) -> list:
        name, n = type(self).__name__, len(self.cells)
        if state is None:
            return [None] * n
        if not isinstance(state, (list, tuple)) or len(state) != n:
            got = f"{len(state)} entries" if isinstance(state, (list, tuple)) else \
                type(state).__name__
            raise ValueError(f"{name}: state takes None or the list of {n} cell states it "
                             f"returned (num_layers x num_directions), got {got}")
        B, (H, W) = x.shape[0], x.shape[-2:]
        form = "a (h, c) pair" if self.state_tensors == 2 else "a tensor h"
        for k, s in enumerate(state):
            if s is None:
                continue
            layer, direction = divmod(k, self.num_directions)
            want = (B, self.hidden_channels[layer], H, W)
            parts = tuple(s) if isinstance(s, (list, tuple)) else (s,)
            if (isinstance(s, torch.Tensor) != (self.state_tensors == 1)
                    or len(parts) != self.state_tensors
                    or any(not isinstance(p, torch.Tensor) or tuple(p.shape) != want
                           for p in parts)):
                got = [tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                       for p in parts]
                raise ValueError(
                    f"{name}: state[{k}] (layer {layer}, "
                    f"{'backward' if direction else 'forward'}) should be {form}, each "
                    f"{want} for this x, got {got if len(got) > 1 else got[0]}")
        return list(state)

    def extra_repr(self) -> str:
        hidden = self.hidden_channels
        kernels = self.kernel_size
        return (f"{self.in_channels}, {hidden[0] if len(set(hidden)) == 1 else list(hidden)}, "
                f"kernel_size={kernels[0] if len(set(kernels)) == 1 else list(kernels)}, "
                f"num_layers={self.num_layers}, batch_first={self.batch_first}, "
                f"bidirectional={self.bidirectional}, dropout={self.dropout}, "
                f"input_conv={self.input_conv!r}")


class ConvLSTM(ConvRNNLayer):
    """ConvLSTM layers (`ConvLSTMCell`, Shi et al. 2015) over a sequence, like torch.nn.LSTM.

    x (B, T, C_in, H, W) -> output (B, T, D*C_hid, H, W), state: a list of (h, c), one per
    layer and direction (see `ConvRNNLayer` for every argument). ``peephole`` and ``norm``
    are the cell's.
    """

    cell_class = ConvLSTMCell
    state_tensors = 2

    def __init__(self, in_channels: int, hidden_channels: int | Sequence[int],
                 kernel_size: Kernel | list[Kernel], num_layers: int = 1, *,
                 batch_first: bool = True, bidirectional: bool = False, dropout: float = 0.0,
                 input_conv: str = "auto", peephole: bool = False, norm: str | None = None):
        super().__init__(in_channels, hidden_channels, kernel_size, num_layers,
                         batch_first=batch_first, bidirectional=bidirectional, dropout=dropout,
                         input_conv=input_conv, peephole=peephole, norm=norm)


class ConvGRU(ConvRNNLayer):
    """ConvGRU layers (`ConvGRUCell`) over a sequence, like torch.nn.GRU.

    x (B, T, C_in, H, W) -> output (B, T, D*C_hid, H, W), state: a list of h, one per layer
    and direction (see `ConvRNNLayer` for every argument). ``norm`` is the cell's.
    """

    cell_class = ConvGRUCell

    def __init__(self, in_channels: int, hidden_channels: int | Sequence[int],
                 kernel_size: Kernel | list[Kernel], num_layers: int = 1, *,
                 batch_first: bool = True, bidirectional: bool = False, dropout: float = 0.0,
                 input_conv: str = "auto", norm: str | None = None):
        super().__init__(in_channels, hidden_channels, kernel_size, num_layers,
                         batch_first=batch_first, bidirectional=bidirectional, dropout=dropout,
                         input_conv=input_conv, norm=norm)


class TrajGRU(ConvRNNLayer):
    """TrajGRU layers (`TrajGRUCell`, Shi et al. 2017) over a sequence, like torch.nn.GRU.

    x (B, T, C_in, H, W) -> output (B, T, D*C_hid, H, W), state: a list of h, one per layer
    and direction (see `ConvRNNLayer` for every argument). ``kernel_size`` is the flow
    generator's (5 in the paper); ``links``, ``norm``, ``flow_channels`` and
    ``input_kernel_size`` (the 3x3 input-to-state convolution) are the cell's.
    """

    cell_class = TrajGRUCell

    def __init__(self, in_channels: int, hidden_channels: int | Sequence[int],
                 kernel_size: Kernel | list[Kernel], num_layers: int = 1, *,
                 batch_first: bool = True, bidirectional: bool = False, dropout: float = 0.0,
                 input_conv: str = "auto", links: int = 13, norm: str | None = None,
                 flow_channels: int = 32, input_kernel_size: Kernel = 3):
        super().__init__(in_channels, hidden_channels, kernel_size, num_layers,
                         batch_first=batch_first, bidirectional=bidirectional, dropout=dropout,
                         input_conv=input_conv, links=links, norm=norm,
                         flow_channels=flow_channels, input_kernel_size=input_kernel_size)
