"""Architectures as data. Edit a preset here, or add one to PRESETS, to try a new model.

A preset describes an encoder-forecaster (Shi et al. 2015, §3.3) as a list of stages,
bottom (full resolution) first. Stage k of the encoder runs its ``down`` block, then a
recurrent cell with ``hidden`` channels. The forecaster runs the stages top first: each
cell starts from the encoder state of the same stage, then its ``up`` block feeds the
stage below; the top cell has no input. ``head`` turns the bottom stage's ``up`` output
into frames. Every block but the head's last conv is followed by LeakyReLU(0.2); after the
head's last conv, ``head_activation`` decides.

    frames -> down1 -> cell1 -> down2 -> cell2 -> ...            (encoder)
                        |states           |states
    frames <- head <- up1 <- cell1 <- up2 <- cell2 <- ...        (forecaster)

``model.build_model`` checks that the channels chain, that strides divide the frame size,
that kernels are odd and that the cell takes the ``cell_options``, and names the stage or
field that doesn't fit (``model.check_preset``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from utils import UsageError


@dataclass
class Conv:
    """A convolution block: Conv2d, or ConvTranspose2d with ``transposed=True``.

    Padding is derived: (kernel - 1) / 2 for a conv, (kernel - stride) / 2 for a
    transposed conv, so a conv divides H and W by ``stride`` and a transposed conv
    multiplies them by it.
    """
    in_channels: int
    out_channels: int
    kernel: int
    stride: int = 1
    transposed: bool = False


@dataclass
class Stage:
    down: Conv    # encoder block before this stage's cell; downsamples by down.stride
    hidden: int   # channels of this stage's cells (the forecaster starts from the encoder's state)
    up: Conv      # forecaster block after this stage's cell; must upsample by down.stride


@dataclass
class Preset:
    cell: str                  # "convlstm" | "convgru" | "trajgru" (see ConvRNN.CELLS)
    stages: list[Stage]        # bottom (full resolution) first; 1 to 5 stages work
    head: list[Conv]           # after the bottom stage's up block; the last conv makes frames
    cell_kernel: int = 5       # odd; 'same' padding
    norm: str | None = "group" # GroupNorm on gate pre-activations, as the original repo
    cell_options: dict = field(default_factory=dict)  # extra cell kwargs, e.g. {"peephole": True}
    # After the head's last conv: "leaky" is LeakyReLU(0.2), as the original repo; None keeps
    # the raw conv output. None is the default because checkpoints saved before this field
    # existed lack it, and must rebuild the raw-output model they were trained as.
    head_activation: str | None = None
    # The frames: channels and size. main.py sets both from --train-data (model.fit_to_data);
    # image_size is one number for square frames or [H, W].
    frame_channels: int = 1
    image_size: int | list[int] = 64
    frames_input: int = 10     # default sequence lengths; main.py flags override
    frames_output: int = 10
    batch_size: int = 16       # recommended training defaults; main.py flags override
    # The peak of main.py's one-cycle schedule: 3x the original's constant 1e-4, the ratio
    # that won tiny's study (docs/results.md); unverified on these presets until a GPU run.
    lr: float = 3e-4
    epoch_size: int = 10_000   # sequences per epoch, as in the original
    val_size: int = 1_000      # validation sequences scored after every epoch
    epochs: int = 200          # the schedule's length, as OpenSTL's; early stopping may end it
    # A lighter preset that a schedule fitted to --time-budget trains instead where this one
    # fits fewer than `lighter_below` steps in the budget (main.fit_to_budget): on a slow
    # machine more steps of a smaller model learn more than a few of this one. None: never.
    lighter: str | None = None
    lighter_below: int = 0

    def to_dict(self) -> dict:
        """Plain data (for config.json and checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preset":
        d = dict(d)  # a dict from before a field existed gets that field's default
        d["stages"] = [Stage(down=Conv(**s["down"]), hidden=s["hidden"], up=Conv(**s["up"]))
                       for s in d["stages"]]
        d["head"] = [Conv(**c) for c in d["head"]]
        return cls(**d)


def _original(cell: str) -> Preset:
    """The original repo's architecture: 3 stages, 64/96/96 channels at 64/32/16 px.

    Its last layer, decoder.stage1.conv4_leaky_1, is followed by LeakyReLU(0.2) like every
    other, hence head_activation="leaky".
    """
    return Preset(
        cell=cell,
        stages=[
            Stage(down=Conv(1, 16, 3, stride=1), hidden=64, up=Conv(64, 16, 3, stride=1)),
            Stage(down=Conv(64, 64, 3, stride=2), hidden=96,
                  up=Conv(96, 96, 4, stride=2, transposed=True)),
            Stage(down=Conv(96, 96, 3, stride=2), hidden=96,
                  up=Conv(96, 96, 4, stride=2, transposed=True)),
        ],
        head=[Conv(16, 1, 1)],
        cell_kernel=5,
        norm="group",
        head_activation="leaky",
    )


PRESETS: dict[str, Preset] = {
    "convlstm": _original("convlstm"),  # 8,110,625 parameters
    "convgru": _original("convgru"),    # 6,189,089 parameters
    # TrajGRU (Shi et al. 2017) as in its Moving MNIST++ setup: these stages, no norm,
    # L = 13 links, batch 4 (lr 1e-4 is the default). It follows that paper, not the
    # original repo, so it keeps the raw head output rather than the original's LeakyReLU.
    "trajgru": dataclasses.replace(_original("trajgru"), norm=None, head_activation=None,
                                   cell_options={"links": 13},
                                   batch_size=4),  # 3,869,853 parameters
    # Small enough to learn visibly in minutes on a CPU; tests use it too. 1,132,785
    # parameters. Its first stage sees the frames at 16x16 through a stride-4 conv, as
    # PredRNN's and OpenSTL's ConvLSTM see 4x4 patches: at the compute of two 32/32-channel
    # stages at 32x32 and 16x16, 64 channels at 16x16 and 8x8 predicted sharper digits
    # (docs/results.md, the recipe study).
    "tiny": Preset(
        cell="convlstm",
        stages=[
            Stage(down=Conv(1, 32, 5, stride=4), hidden=64,
                  up=Conv(64, 16, 8, stride=4, transposed=True)),
            Stage(down=Conv(64, 64, 3, stride=2), hidden=64,
                  up=Conv(64, 64, 4, stride=2, transposed=True)),
        ],
        head=[Conv(16, 16, 3), Conv(16, 1, 1)],
        cell_kernel=3,
        norm="group",
        # Not the original's architecture, so no reason to copy its last LeakyReLU. A raw
        # output may go below 0, where the metrics clip it; a LeakyReLU would only shrink
        # those values, not remove them.
        head_activation=None,
        batch_size=8,
        lr=3e-3,           # the one-cycle peak that won the study
        epoch_size=2_000,  # short epochs: the schedule and early stopping act within minutes
        # 1,000 took 41 s an epoch on a 2-core AVX2 CPU, 15% of its 15 minutes; 250 leave
        # that time to training (docs/results.md, the slow-CPU study)
        val_size=250,
        epochs=16,         # without --time-budget; the quick start fits its own length
        # On a 2-core CPU without native bf16 tiny fits 800-1,200 steps in the quick start's
        # 15 minutes, and tiny_lite more than twice as many, which score better
        # (docs/results.md, the slow-CPU study); a CPU with AVX512-BF16 fits about 3,700
        # and keeps tiny.
        lighter="tiny_lite",
        lighter_below=2_000,
    ),
}
# What tiny trains where it is slow: tiny with 32 channels in its first stage instead of 64,
# and a lighter full-resolution head: the first stage's up block puts each 16x16 pixel's
# 4x4 patch out as 8 channels (kernel = stride, as PredRNN's patches), which one 3x3 conv
# of 8 channels then joins. 648,953 parameters; on a 2-core AVX2 CPU about 2.3x the steps a
# second of tiny, where the full-resolution head took a third of a step (docs/results.md).
PRESETS["tiny_lite"] = dataclasses.replace(
    PRESETS["tiny"],
    stages=[
        Stage(down=Conv(1, 32, 5, stride=4), hidden=32, up=Conv(32, 8, 4, stride=4, transposed=True)),
        Stage(down=Conv(32, 64, 3, stride=2), hidden=64, up=Conv(64, 32, 4, stride=2, transposed=True)),
    ],
    head=[Conv(8, 8, 3), Conv(8, 1, 1)],
    lighter=None, lighter_below=0)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])  # callers may edit their copy
