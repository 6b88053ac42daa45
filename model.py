"""The encoder-forecaster: built from a net_params preset (checked first), or loaded from a checkpoint.

    from model import build_model, load_model
    model = build_model("tiny")                              # fresh weights
    model = build_model("tiny", channels=4)                  # for 4-channel frames
    model = load_model("runs/X/checkpoints/best.pt")         # trained, in eval mode
    pred = model(x, frames_output=10)  # x (B, T_in, C, H, W) -> (B, 10, C, H, W)

The network works on values in [0, 1]. A run trained with --value-range LO HI maps its
data there linearly; load_model then gives a model that takes and returns the data's own
units (InDataUnits).

Needs only torch and the standard library (and the repo's cells, blocks and presets).
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from checkpoints import load_checkpoint, load_weights
from ConvRNN import CELLS
from decoder import Forecaster
from encoder import Encoder
from net_params import Conv, Preset, get_preset
from utils import UsageError, first_line

FIX = "fix net_params.py"


def _check_conv(where: str, spec: Conv) -> None:
    if spec.in_channels < 1 or spec.out_channels < 1 or spec.stride < 1:
        raise UsageError(f"{where}: channels and stride must be >= 1, got {spec}; {FIX}")
    if spec.transposed:
        if spec.kernel < spec.stride or (spec.kernel - spec.stride) % 2:
            raise UsageError(
                f"{where}: a transposed conv with stride {spec.stride} needs kernel - stride "
                f"even and >= 0 to upsample exactly, got kernel {spec.kernel} "
                f"(e.g. kernel {spec.stride + 2}); {FIX}")
    elif spec.kernel % 2 == 0:
        raise UsageError(f"{where}: kernel {spec.kernel} is even; convs need odd kernels "
                         f"for 'same' padding; {FIX}")


HEAD_ACTIVATIONS = (None, "leaky")  # see Preset.head_activation
NORMS = (None, "none", "group")      # see ConvRNN.norm_layer


def _check_cell_options(preset: Preset) -> None:
    """The cell's keyword-only constructor arguments are its options; the preset sets norm."""
    if not isinstance(preset.cell_options, dict):
        raise UsageError(f"cell_options must be a dict of cell keyword arguments, got "
                         f"{preset.cell_options!r}; {FIX}")
    signature = inspect.signature(CELLS[preset.cell].__init__)
    options = [name for name, p in signature.parameters.items()
               if p.kind is p.KEYWORD_ONLY and name != "norm"]
    for key in preset.cell_options:
        if key == "norm":
            raise UsageError(f"cell_options: set the norm with the preset's norm field, not in "
                             f"cell_options; {FIX}")
        if key not in options and options:
            raise UsageError(f"cell_options: {preset.cell} cells take no option {key!r}; "
                             f"their options are {', '.join(options)} (norm is the preset's "
                             f"own field); {FIX}")
        if key not in options:
            raise UsageError(f"cell_options: {preset.cell} cells take no options, got {key!r} "
                             f"(norm is the preset's own field); {FIX}")


def frame_size(preset: Preset) -> tuple[int, int]:
    """(H, W) of the preset's frames: image_size is one number (square) or [H, W]."""
    size = preset.image_size
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return int(size[0]), int(size[1])
    raise UsageError(f"image_size {size!r} is neither a number nor [H, W]; {FIX}")


def total_stride(preset: Preset) -> int:
    """How much the stages downsample in all: H and W must be multiples of it."""
    stride = 1
    for stage in preset.stages:
        stride *= stage.down.stride
    return stride


def fit_to_data(preset: Preset | str, channels: int, size: tuple[int, int] | None = None) -> Preset:
    """A checked copy of `preset` for frames of `channels` channels (and `size` (H, W)): the
    first stage's down conv takes the channels and the head's last conv gives them back; the
    rest of the architecture stays. UsageError, naming the stage, if it doesn't fit."""
    preset = copy.deepcopy(get_preset(preset) if isinstance(preset, str) else preset)
    if channels < 1:
        raise UsageError(f"frames need at least one channel, got {channels}")
    if preset.stages and preset.head:
        preset.stages[0].down.in_channels = channels
        preset.head[-1].out_channels = channels
    preset.frame_channels = channels
    if size is not None:
        h, w = (int(v) for v in size)
        preset.image_size = h if h == w else [h, w]
    check_preset(preset)
    return preset


def check_preset(preset: Preset) -> None:
    """Raise UsageError naming the stage or field and the mismatch if the preset can't be built."""
    if preset.cell not in CELLS:
        raise UsageError(f"unknown cell {preset.cell!r}; known cells: "
                         f"{', '.join(sorted(CELLS))}; {FIX}")
    _check_cell_options(preset)
    if preset.norm not in NORMS:
        raise UsageError(f"norm {preset.norm!r} is unknown; use 'group' or None; {FIX}")
    if preset.head_activation not in HEAD_ACTIVATIONS:
        raise UsageError(f"head_activation {preset.head_activation!r} is unknown; use 'leaky' "
                         f"(LeakyReLU(0.2) after the head's last conv, as the original repo) "
                         f"or None (the raw conv output); {FIX}")
    if preset.cell_kernel < 1 or preset.cell_kernel % 2 == 0:
        raise UsageError(f"cell_kernel {preset.cell_kernel} is even; cells need odd kernels "
                         f"for 'same' padding; {FIX}")
    if not preset.stages:
        raise UsageError(f"a preset needs at least one stage; {FIX}")
    if not preset.head:
        raise UsageError(f"the head needs at least one conv to make frames; {FIX}")
    height, width = frame_size(preset)
    channels, source = preset.frame_channels, "the frames have"
    for k, stage in enumerate(preset.stages, start=1):
        name = f"stage {k}"
        _check_conv(f"{name} down", stage.down)
        _check_conv(f"{name} up", stage.up)
        if stage.down.in_channels != channels:
            raise UsageError(f"{name}: down conv expects {stage.down.in_channels} input channels "
                             f"but {source} {channels}; {FIX}")
        if stage.hidden < 1:
            raise UsageError(f"{name}: hidden must be >= 1, got {stage.hidden}; {FIX}")
        if stage.up.in_channels != stage.hidden:
            raise UsageError(f"{name}: up block expects {stage.up.in_channels} input channels "
                             f"but the stage's cell gives {stage.hidden}; {FIX}")
        if stage.up.stride > 1 and not stage.up.transposed:
            raise UsageError(f"{name}: a stride-{stage.up.stride} up block must be "
                             f"transposed=True to upsample; {FIX}")
        if stage.up.stride != stage.down.stride:
            raise UsageError(f"{name}: up stride {stage.up.stride} must mirror down stride "
                             f"{stage.down.stride} so the forecaster's sizes meet the "
                             f"encoder's; {FIX}")
        if height % stage.down.stride or width % stage.down.stride:
            raise UsageError(f"{name}: stride {stage.down.stride} does not divide the "
                             f"{height}x{width} map it gets (image_size {preset.image_size}); "
                             f"change the stride or the frame size")
        height, width = height // stage.down.stride, width // stage.down.stride
        channels, source = stage.hidden, f"{name}'s cell gives"
    # Forecaster: the bottom stage's up block feeds the head.
    channels, source = preset.stages[0].up.out_channels, "stage 1's up block"
    for j, spec in enumerate(preset.head, start=1):
        _check_conv(f"head conv {j}", spec)
        if spec.stride != 1 or spec.transposed:
            raise UsageError(f"head conv {j}: the head keeps the frame size; use stride 1, "
                             f"not transposed; {FIX}")
        if spec.in_channels != channels:
            raise UsageError(f"head conv {j}: expects {spec.in_channels} input channels but "
                             f"{source} gives {channels}; {FIX}")
        channels, source = spec.out_channels, f"head conv {j}"
    if channels != preset.frame_channels:
        raise UsageError(f"the head's last conv makes {channels} channels but frames have "
                         f"{preset.frame_channels}; {FIX}")


class EncoderForecaster(nn.Module):
    """(B, T_in, C, H, W) frames in [0, 1] -> (B, T_out, C, H, W) predicted frames.

    The output is the head's last conv, followed by LeakyReLU(0.2) where the preset's
    head_activation is "leaky"; never squashed to [0, 1]. The MSE loss and the MSE/MAE
    metrics use it as is.
    """

    def __init__(self, preset: Preset):
        super().__init__()
        check_preset(preset)
        self.preset = preset
        self.encoder = Encoder(preset)
        self.forecaster = Forecaster(preset)
        self.total_stride = total_stride(preset)

    def forward(self, x: torch.Tensor, frames_output: int | None = None) -> torch.Tensor:
        p = self.preset
        frames_output = p.frames_output if frames_output is None else frames_output
        if x.dim() != 5 or x.shape[2] != p.frame_channels:
            raise ValueError(f"expected input (B, T, {p.frame_channels}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % self.total_stride or W % self.total_stride:
            raise ValueError(f"frames of {H}x{W} can't pass stages that downsample by "
                             f"{self.total_stride} in all; use a size divisible by "
                             f"{self.total_stride} or change the strides in net_params.py")
        if frames_output < 1:
            raise ValueError(f"frames_output must be >= 1, got {frames_output}")
        return self.forecaster(self.encoder(x), frames_output)


def build_model(name_or_preset: str | Preset | dict, *, channels: int | None = None,
                size: tuple[int, int] | None = None) -> EncoderForecaster:
    """A preset name from net_params.PRESETS, a Preset, or a Preset.to_dict() (checkpoints).

    `channels` and `size` (H, W) fit the preset to the data's frames (fit_to_data); without
    them the preset's own frame_channels and image_size stand.
    """
    if isinstance(name_or_preset, str):
        preset = get_preset(name_or_preset)
    elif isinstance(name_or_preset, dict):
        preset = Preset.from_dict(name_or_preset)
    else:
        preset = name_or_preset
    if channels is not None or size is not None:
        preset = fit_to_data(preset, preset.frame_channels if channels is None else channels, size)
    return EncoderForecaster(preset)


# ----------------------------------------------------------------------------------------
# The data's own units: --value-range LO HI maps them linearly to the network's [0, 1]

def to_unit(x: torch.Tensor, value_range) -> torch.Tensor:
    """Data units -> [0, 1]: (x - LO) / (HI - LO); x itself where value_range is None."""
    if value_range is None:
        return x
    lo, hi = value_range
    return (x - lo) / (hi - lo)


def from_unit(y: torch.Tensor, value_range) -> torch.Tensor:
    """[0, 1] -> data units: LO + (HI - LO) y; y itself where value_range is None."""
    if value_range is None:
        return y
    lo, hi = value_range
    return y * (hi - lo) + lo


class InDataUnits(nn.Module):
    """A forecaster in the data's own units: x (B, T_in, C, H, W) in [LO, HI] (values
    outside are clipped, as in training) -> (B, T_out, C, H, W) in the same units.

    `network` is the EncoderForecaster inside; it sees the frames mapped to [0, 1].
    """

    def __init__(self, network: EncoderForecaster, value_range):
        super().__init__()
        self.network = network
        self.value_range = tuple(float(v) for v in value_range)

    def forward(self, x: torch.Tensor, frames_output: int | None = None) -> torch.Tensor:
        x = to_unit(x.clamp(*self.value_range), self.value_range)
        return from_unit(self.network(x, frames_output), self.value_range)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_model(path, map_location="cpu", *, data_units: bool = True) -> nn.Module:
    """The forecaster of a checkpoint, in eval mode on the device `map_location` names.

    Any checkpoint main.py writes (a run's last.pt or best.pt) or tools/convert_original.py
    makes: the checkpoint's config rebuilds the model, its weights fill it. Call it as
    `model(x, frames_output=N)`. It takes and gives values in the data's units: for a run
    with --value-range LO HI an InDataUnits around the network, else the EncoderForecaster
    itself (whose units are [0, 1]). data_units=False gives the network alone, on [0, 1].
    A file that is no such checkpoint, or whose weights don't fit the model its config
    describes, raises one UsageError naming the file.
    """
    checkpoint = load_checkpoint(path, map_location)
    try:
        model = build_model(checkpoint["config"]["model"])
    except (KeyError, TypeError, ValueError) as err:  # a config of another version or project
        raise UsageError(f"{path}: its config describes no model this version builds "
                         f"({first_line(err)})") from None
    load_weights(model, checkpoint["model"], path)
    model = model.to(map_location).eval()
    value_range = checkpoint["config"].get("value_range")
    return model if value_range is None or not data_units else InDataUnits(model, value_range).eval()
