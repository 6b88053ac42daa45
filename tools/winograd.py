"""Winograd convolution F(4x4, 5x5), opt-in: `use_winograd(model)` runs the wide 5x5 cell
convolutions of a model with it. docs/speed.md has the measurements and the story.

Lavin & Gray 2016 ("Fast Algorithms for Convolutional Neural Networks", arXiv 1509.09308):
each 4x4 output tile of an r x r convolution is

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise, d the (4+r-1)^2 input tile)

so the channel mixing becomes 64 independent matrix products, one per "bin", with
64 / 16 = 4 multiplies per output pixel and channel pair instead of 25 for a 5x5 kernel.
The transforms are matrix products with constant matrices, so the backward pass, which
autograd assembles, is itself a Winograd algorithm for grad input and grad weight.

Why: on the CPU the model's direct fp32 convolutions already run at the FMA peak, so fewer
multiplies is the only way left to a faster fp32 step. On CUDA cuDNN picks its own
algorithms. Only 5x5 is built: F(4x4, 3x3) lost to oneDNN's direct 3x3 kernels at every
width the presets use.

Numerics: the interpolation points are 0, +-1, +-2, +-1/2, the standard choice. In float32
the result differs from a direct convolution by about 1e-5 of the output's scale (a direct
convolution's own rounding is about 5e-7); in float64 they agree to 1e-13. Under autocast
the direct convolution runs: the transforms' coefficients (up to 5.25) would amplify
bf16/fp16 rounding.
"""

from __future__ import annotations

from fractions import Fraction
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

TILE = 4  # output tile m: F(m x m, r x r)
# Where Winograd beats oneDNN's direct convolution, forward + backward, measured on a 2-core
# AVX-512 CPU (direct time / Winograd time): 5x5 64->256 at 64x64 1.29, 96->384 at 32x32
# 1.74, 96->96 1.27, 64->128 1.30; but 64->64 0.91, 64->32 0.53, 32->128 about 1.0, and
# F(4x4, 3x3) 0.4-0.8 below 128 channels. Elsewhere the transforms cost more than the
# multiplies they save.
MIN_IN_CHANNELS = 64
MIN_OUT_CHANNELS = 96
KERNEL = 5
POINTS = (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))  # a - 1 = 7 finite points


@cache
def winograd_matrices(r: int = KERNEL, m: int = TILE) -> tuple[tuple, tuple, tuple]:
    """(A^T, G, B^T) of F(m, r) as tuples of exact Fractions (Toom-Cook, point at infinity).

    A^T is m x a, G is a x r and B^T is a x a, with a = m + r - 1, such that for every input
    row d (length a) and filter g (length r)
        A^T [(G g) * (B^T d)] = [sum_k d[i + k] g[k] for i < m]   (a correlation, as conv2d).
    """
    a = m + r - 1
    if len(POINTS) != a - 1:
        raise ValueError(f"Winograd F({m}, {r}) needs {a - 1} points; POINTS has "
                         f"{len(POINTS)}, set up for F({TILE}, {KERNEL})")
    p = [Fraction(x) for x in POINTS]
    # Lagrange denominators prod_{l != j} (p_j - p_l)
    den = [_prod(p[j] - p[i] for i in range(a - 1) if i != j) for j in range(a - 1)]
    AT = [[p[j] ** i for j in range(a - 1)] + [Fraction(int(i == m - 1))] for i in range(m)]
    G = [[p[j] ** k / den[j] for k in range(r)] for j in range(a - 1)]
    G.append([Fraction(int(k == r - 1)) for k in range(r)])
    # B^T: row j < a-1 holds the coefficients of N(x) / (x - p_j), N(x) = prod_l (x - p_l),
    # as a polynomial of degree a-2 (row a-1 holds N itself): the modular (CRT) reconstruction
    # of the linear convolution, transposed into a correlation.
    N = _poly_from_roots(p)                     # degree a-1, coefficients low to high
    BT = [_poly_div_root(N, p[j]) + [Fraction(0)] for j in range(a - 1)]
    BT.append(N)
    return tuple(map(tuple, AT)), tuple(map(tuple, G)), tuple(map(tuple, BT))


def _prod(xs) -> Fraction:
    out = Fraction(1)
    for x in xs:
        out *= x
    return out


def _poly_from_roots(roots) -> list[Fraction]:
    coeffs = [Fraction(1)]                       # low to high
    for root in roots:
        shifted = [Fraction(0)] + coeffs         # x * poly
        coeffs = [s - root * c for s, c in zip(shifted, coeffs + [Fraction(0)], strict=True)]
    return coeffs


def _poly_div_root(coeffs: list[Fraction], root: Fraction) -> list[Fraction]:
    """coeffs / (x - root), exact (root is a root): synthetic division, low to high out."""
    high = coeffs[::-1]
    out = [high[0]]
    for c in high[1:-1]:
        out.append(c + root * out[-1])
    return out[::-1]


def _kron_float64() -> tuple[torch.Tensor, ...]:
    AT, G, BT = (torch.tensor([[float(v) for v in row] for row in mat], dtype=torch.float64)
                 for mat in winograd_matrices())
    return tuple(torch.kron(mat, mat) for mat in (BT, G, AT))


# Kronecker forms for flattened tiles: B (64 x 64), G (64 x 25), A^T (16 x 64). Built at
# import and kept in plain dicts, which torch.compile reads as constants (it would trace
# through a functools cache and warn).
_KRON = _kron_float64()
_KRON_CAST: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _kron_matrices(dtype: torch.dtype, device: torch.device):
    key = (dtype, device)
    if key not in _KRON_CAST:
        _KRON_CAST[key] = tuple(mat.to(device=device, dtype=dtype) for mat in _KRON)
    return _KRON_CAST[key]


class _Transform(torch.autograd.Function):
    """K @ X for a constant K (out x in) and a very wide X (in x N); saves nothing but K.

    Both directions run as a 1x1 convolution over N "pixels": oneDNN runs these skinny
    products 1.3-2x faster than the BLAS matmul does on the CPU. A plain convolution would
    also keep X for a weight gradient that K never needs (for the output transform X is
    4x the size of the output), so the backward is written out: grad X = K^T @ grad.
    """

    @staticmethod
    def forward(ctx, K: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(K)
        return _conv1x1(K, X)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (K,) = ctx.saved_tensors
        return None, _conv1x1(K.t().contiguous(), grad)


class _Tiles(torch.autograd.Function):
    """The overlapping a x a tiles, m apart, of a padded (N, C, Hp, Wp) batch, as the
    (a^2, N*th*tw*C) matrix the input transform takes: tile element first, C innermost.

    autograd's own backward of Tensor.unfold scatters element by element and took 10% of
    a convlstm step. Here a = 2m (8 = 2 x 4) and Hp, Wp are multiples of m, so each
    gradient pixel gets at most one term from each of the four (tile row, tile column)
    half-offsets: four strided additions of whole (m x m)-block grids do it.
    """

    @staticmethod
    def forward(ctx, xp: torch.Tensor, a: int, m: int) -> torch.Tensor:
        assert a == 2 * m and xp.shape[2] % m == 0 and xp.shape[3] % m == 0
        tiles = xp.unfold(2, a, m).unfold(3, a, m)               # (N, C, th, tw, a, a)
        ctx.a, ctx.m, ctx.xp_shape = a, m, xp.shape
        ctx.channels_last = xp.is_contiguous(memory_format=torch.channels_last)
        return tiles.permute(4, 5, 0, 2, 3, 1).reshape(a * a, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, m = ctx.a, ctx.m
        N, C, Hp, Wp = ctx.xp_shape
        th, tw = (Hp - a) // m + 1, (Wp - a) // m + 1
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        gx = grad.new_zeros(ctx.xp_shape).contiguous(memory_format=fmt)
        blocks = gx.unflatten(3, (tw + 1, m)).unflatten(2, (th + 1, m))  # (N, C, th+1, m, tw+1, m)
        g = grad.view(2, m, 2, m, N, th, tw, C)                  # tile row i = q*m + s, col j
        for q in (0, 1):
            for q2 in (0, 1):
                blocks[:, :, q:q + th, :, q2:q2 + tw, :] += g[q, :, q2].permute(2, 5, 3, 0, 4, 1)
        return gx, None, None


def _conv1x1(K: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    out, inner = K.shape
    return F.conv2d(X.reshape(1, inner, -1, 1), K.view(out, inner, 1, 1)).view(out, -1)


def _apply(K: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return _Transform.apply(K, X)


def _check_weight(weight: torch.Tensor, in_channels: int | None = None) -> None:
    O, C, r, r2 = weight.shape
    if (r, r2) != (KERNEL, KERNEL) or (in_channels is not None and C != in_channels):
        want = "C" if in_channels is None else in_channels
        raise ValueError(f"winograd_conv2d takes weights (O, {want}, {KERNEL}, {KERNEL}), "
                         f"got {tuple(weight.shape)}; use F.conv2d for other kernels")


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """G g G^T of every (O, C) filter: (O, C, 5, 5) -> (64, C, O), bins first.

    A recurrent cell's state convolution uses the same weights at every step: a
    WinogradConv2d computes this once per model forward (see `use_winograd`), and autograd
    sums the steps' gradients before transforming them back once.
    """
    _check_weight(weight)
    O, C = weight.shape[:2]
    _, KG, _ = _kron_matrices(weight.dtype, weight.device)
    U = _apply(KG, weight.reshape(O, C, -1).permute(2, 1, 0).reshape(-1, C * O))
    return U.view(-1, C, O)


# Products whose (a^2, R, O) intermediate exceeds this run in batch chunks: measured on a
# 2-core CPU, the 40-frame 64x64 input convolution of the convlstm preset (670 MB) ran 1.3x
# faster in 3-4 chunks, while 250 MB products gained nothing from splitting.
CHUNK_BYTES = 256 * 2**20


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    *, transformed: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=2) for stride 1, by Winograd F(4x4, 5x5).

    x: (N, C, H, W), any H and W (the last tiles are zero-padded and cropped);
    weight: (O, C, 5, 5); ``transformed``: ``transform_weight(weight)`` if the caller
    already has it. The result has x's memory format.
    """
    N, C, H, W = x.shape
    _check_weight(weight, C)
    U = transform_weight(weight) if transformed is None else transformed
    m, a = TILE, TILE + KERNEL - 1
    tiles = (-(-H // m)) * (-(-W // m))
    chunks = min(N, -(-a * a * N * tiles * weight.shape[0] * x.element_size() // CHUNK_BYTES))
    if chunks > 1:
        y = torch.cat([_winograd(part, U) for part in x.split(-(-N // chunks))])
    else:
        y = _winograd(x, U)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


def _winograd(x: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    N, C, H, W = x.shape
    O = U.shape[-1]
    m, r = TILE, KERNEL
    a, p = m + r - 1, r // 2
    KB, _, KA = _kron_matrices(x.dtype, x.device)
    th, tw = -(-H // m), -(-W // m)
    # pad so that th x tw tiles of a x a, m apart, cover the image with its 'same' border
    xp = F.pad(x, (p, m * tw + r - 1 - W - p, p, m * th + r - 1 - H - p))
    R = N * th * tw
    D = _Tiles.apply(xp, a, m)                                   # (a^2, R * C)
    V = _apply(KB, D).view(a * a, R, C)                          # B^T d B per tile
    M = torch.bmm(V, U)                                          # (a^2, R, O)
    Y = _apply(KA, M.view(a * a, R * O)).view(m, m, N, th, tw, O)  # A^T M A per tile
    y = Y.permute(2, 3, 0, 4, 1, 5).reshape(N, m * th, m * tw, O)[:, :H, :W]
    y = y.permute(0, 3, 1, 2)                                    # channels_last (N, O, H, W)
    if not x.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous()
    return y


class WinogradConv2d(nn.Conv2d):
    """nn.Conv2d that runs as Winograd F(4x4, 5x5) where that is faster and exact enough.

    The parameters and state_dict are nn.Conv2d's. `winograd_applies` says when Winograd
    runs: a 5x5 kernel, stride 1, padding 2, no dilation or groups, zeros padding, at least
    MIN_IN_CHANNELS in and MIN_OUT_CHANNELS out, float32/float64 weights and input, no
    autocast. Every other call is the direct F.conv2d. Build one with `use_winograd`.
    """

    _reuse: _PerForward | None = None  # set by use_winograd

    @classmethod
    def sharing(cls, conv: nn.Conv2d) -> WinogradConv2d:
        """A WinogradConv2d holding the very Parameter objects of ``conv``."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        return new.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.winograd_applies(x):
            return winograd_conv2d(x, self.weight, self.bias, transformed=self._transformed())
        return super().forward(x)

    def winograd_applies(self, x: torch.Tensor) -> bool:
        return (_shape_fits(self) and x.dim() == 4
                and self.weight.dtype in (torch.float32, torch.float64)
                and x.dtype == self.weight.dtype and not _autocast_on(x.device))

    def _transformed(self) -> torch.Tensor | None:
        """The weight transform shared by this forward's calls; None outside a forward."""
        reuse = self._reuse
        if reuse is None or not reuse.active or torch.compiler.is_compiling():
            return None
        # a new weight version (an in-place update) or grad mode needs a new transform
        key = (self.weight._version, torch.is_grad_enabled())
        hit = reuse.transforms.get(self)
        if hit is None or hit[0] != key:
            hit = reuse.transforms[self] = (key, transform_weight(self.weight))
        return hit[1]


class _PerForward:
    """Weight transforms shared for the length of one forward of the model that use_winograd
    was given: a cell's state convolution runs at every time step with the same weights.

    Forward hooks on that model open it and drop the transforms when the forward ends, so
    the next forward computes its own, optimizer step or not: a transform from a graph that
    backward has freed is never used again.
    """

    def __init__(self):
        self.active = False
        self.transforms: dict[WinogradConv2d, tuple] = {}  # conv -> (key, transform)

    def start(self, module, args) -> None:
        if not torch.compiler.is_compiling():
            self.active, self.transforms = True, {}

    def end(self, module, args, output) -> None:
        if not torch.compiler.is_compiling():
            self.active, self.transforms = False, {}


def _shape_fits(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (KERNEL, KERNEL) and conv.stride == (1, 1)
            and conv.padding in ((KERNEL // 2, KERNEL // 2), "same")
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.in_channels >= MIN_IN_CHANNELS and conv.out_channels >= MIN_OUT_CHANNELS)


def use_winograd(model: nn.Module) -> int:
    """Swap every nn.Conv2d inside ``model`` that Winograd suits (see WinogradConv2d) for
    a WinogradConv2d with the same Parameter objects; returns how many were swapped.

    Optimizers, state_dict keys and checkpoints are unaffected. Call it before wrapping the
    model in DDP or torch.compile: hooks on ``model`` let the convolutions transform their
    weights once per forward. Calling it again swaps nothing new.
    """
    swapped: dict[int, WinogradConv2d] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and _shape_fits(child):
                if id(child) not in swapped:  # a module used twice stays one module
                    swapped[id(child)] = WinogradConv2d.sharing(child)
                setattr(parent, name, swapped[id(child)])
    if swapped:
        reuse = _PerForward()
        model.register_forward_pre_hook(reuse.start)
        model.register_forward_hook(reuse.end, always_call=True)  # also when forward raises
        for conv in swapped.values():
            conv._reuse = reuse
            # cast the constant matrices now: torch.compile recompiles if tracing fills the cache
            _kron_matrices(conv.weight.dtype, conv.weight.device)
    return len(swapped)


def _autocast_on(device: torch.device) -> bool:
    if device.type == "meta":  # FLOP counting (tools/bench.py); autocast has no meta mode
        return False
    return torch.is_autocast_enabled(device.type)
