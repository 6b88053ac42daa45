"""Convert a checkpoint of the original repo (jhhuang96/ConvLSTM-PyTorch) into this repo's format.

    python tools/convert_original.py checkpoint_41_0.001234.pth.tar --arch convlstm --out conv.pt

The original saves ``{'epoch', 'state_dict', 'optimizer'}`` each time its validation loss
improves (``save_model/<timestamp>/checkpoint_<epoch>_<val_loss>.pth.tar``); under
nn.DataParallel every key starts with ``module.``. This writes a checkpoint that
evaluate.py scores as it is: ``{"model", "config", "epoch", "converted_from"}``, for the
``convlstm`` or ``convgru`` preset, which then computes the same function as the
original model (tests/test_convert_original.py checks that to 1e-10 in float64):

* each cell's convolution of cat(x, h) splits into our ``input_conv`` (its first C_in
  input channels, bias-free) and the state convolution (the rest, with the bias);
* the decoder's top cells (``decoder.rnn3``) were only ever fed zeros, so their input
  columns are dropped: our top forecaster cell has no input;
* ``decoder.rnnK``/``stageK`` become ``forecaster.stages[3 - K]`` (the order they run in),
  and ``decoder.stage1``'s last conv the head, whose LeakyReLU the presets keep
  (head_activation="leaky");
* ConvGRU: the original's z is the share of the NEW candidate, ours the share of the old
  state, so z is flipped: σ(−a) = 1 − σ(a). Where z's pre-activation a passes through a
  GroupNorm (both presets), the z half of the norm's weight and bias is negated; the
  norm's input, and so its statistics, are unchanged, so this is exact for any grouping.
  Without a norm, the z rows of both convolutions and of the bias are negated instead.

The optimizer state is not converted. Only the original's published net_params convert.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# The repo root, so that `python tools/convert_original.py` finds model.py from any directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints import atomic_save  # noqa: E402
from model import build_model  # noqa: E402
from net_params import get_preset  # noqa: E402
from utils import DEFAULT_DATA_ROOT, ArgumentParser, UsageError, check, first_line, run_cli  # noqa: E402

ARCHS = ("convlstm", "convgru")
PREFIX = "module."  # what nn.DataParallel puts before every key
OTHER_NET_PARAMS = ("only the original's published convlstm and convgru net_params convert; "
                    "for others, add a matching preset to net_params.py and its names to "
                    "tools/convert_original.py")

# The original's conv layers -> ours. Our blocks are Sequential(conv, LeakyReLU): conv is ".0".
BLOCKS = {
    "encoder.stage1.conv1_leaky_1": "encoder.stages.0.down.0",
    "encoder.stage2.conv2_leaky_1": "encoder.stages.1.down.0",
    "encoder.stage3.conv3_leaky_1": "encoder.stages.2.down.0",
    "decoder.stage3.deconv1_leaky_1": "forecaster.stages.0.up.0",
    "decoder.stage2.deconv2_leaky_1": "forecaster.stages.1.up.0",
    "decoder.stage1.conv3_leaky_1": "forecaster.stages.2.up.0",
    "decoder.stage1.conv4_leaky_1": "forecaster.head.0.0",
}
# The original's cells -> ours. Its decoder runs rnn3 first; our forecaster stores its
# stages in the order they run.
CELLS = {
    "encoder.rnn1": "encoder.stages.0.cell",
    "encoder.rnn2": "encoder.stages.1.cell",
    "encoder.rnn3": "encoder.stages.2.cell",
    "decoder.rnn3": "forecaster.stages.0.cell",
    "decoder.rnn2": "forecaster.stages.1.cell",
    "decoder.rnn1": "forecaster.stages.2.cell",
}
# Per cell type, each of the original's Sequential(conv over cat(x, h), GroupNorm) and the
# state convolution and norm of ours that it becomes.
PARTS = {
    "convlstm": [("conv", "hidden_conv", "norm")],
    "convgru": [("conv1", "gate_conv", "gate_norm"), ("conv2", "candidate_conv", "candidate_norm")],
}


def has_norm(cell, norm: str) -> bool:
    return isinstance(getattr(cell, norm), torch.nn.GroupNorm)


def original_layout(model, arch: str) -> dict[str, tuple]:
    """The keys and shapes the original's state_dict has for the model ``model`` converts to."""
    ours = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    layout = {}
    for theirs, mine in BLOCKS.items():
        for name in ("weight", "bias"):
            layout[f"{theirs}.{name}"] = ours[f"{mine}.{name}"]
    for theirs, mine in CELLS.items():
        cell = model.get_submodule(mine)
        # The original gave its top decoder cells a zero input as wide as their hidden state.
        c_in = cell.input_channels if cell.input_channels else cell.hidden_channels
        for conv, state_conv, norm in PARTS[arch]:
            rows, _, k, _ = ours[f"{mine}.{state_conv}.weight"]
            layout[f"{theirs}.{conv}.0.weight"] = (rows, c_in + cell.hidden_channels, k, k)
            layout[f"{theirs}.{conv}.0.bias"] = (rows,)
            if has_norm(cell, norm):
                layout[f"{theirs}.{conv}.1.weight"] = layout[f"{theirs}.{conv}.1.bias"] = (rows,)
    return layout


def own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy: torch.save would store a slice's whole parent tensor."""
    return t.clone(memory_format=torch.contiguous_format)


def convert_cell(theirs: dict, cell, arch: str) -> dict:
    """One cell: the original's tensors, keyed "conv.0.weight" etc., -> ours ("hidden_conv.weight")."""
    C = cell.hidden_channels
    mine, input_rows = {}, []
    for conv, state_conv, norm in PARTS[arch]:
        weight = theirs[f"{conv}.0.weight"]  # (rows, C_in + C, k, k): cat(x, h), x first
        c_in = weight.shape[1] - C
        input_rows.append(weight[:, :c_in])
        mine[f"{state_conv}.weight"] = own(weight[:, c_in:])
        mine[f"{state_conv}.bias"] = own(theirs[f"{conv}.0.bias"])
        if has_norm(cell, norm):
            mine[f"{norm}.weight"] = own(theirs[f"{conv}.1.weight"])
            mine[f"{norm}.bias"] = own(theirs[f"{conv}.1.bias"])
    if cell.input_conv is not None:  # else: the top decoder cell, whose inputs were zeros
        mine["input_conv.weight"] = own(torch.cat(input_rows))  # ConvGRU: (z, r | n) rows
    if arch == "convgru":
        flip_update_gate(mine, C, has_norm(cell, "gate_norm"))
    return mine


def flip_update_gate(mine: dict, C: int, norm: bool) -> None:
    """z -> 1 − z in place, through σ(−a) = 1 − σ(a) on z's pre-activation a (rows :C)."""
    if norm:  # the norm's output for z is then −a; its input and statistics are unchanged
        names = ["gate_norm.weight", "gate_norm.bias"]
    else:  # a itself: the input and state convolutions' z rows and the bias
        names = [n for n in ("input_conv.weight", "gate_conv.weight", "gate_conv.bias") if n in mine]
    for name in names:
        mine[name][:C] *= -1


def read_original(path: str) -> tuple[dict, object]:
    """(state_dict without "module.", epoch) from a checkpoint file of the original repo."""
    where = f"{path} is not a checkpoint of the original repo"
    if not os.path.isfile(path):
        problem = "it is a directory" if os.path.isdir(path) else "no such file"
        raise UsageError(f"{where}: {problem}; pass one of its save_model/*/checkpoint_*.pth.tar")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for foreign files
        raise UsageError(f"{where}: torch.load failed with {first_line(err)}") from err
    if isinstance(checkpoint, dict) and "model" in checkpoint and "config" in checkpoint:
        raise UsageError(f"{where}: it is already a checkpoint of this repo (it has 'model' "
                         f"and 'config'); use it as it is")
    check(isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict),
          f"{where}: expected a dict with a 'state_dict' dict, found "
          + (f"keys {sorted(map(str, checkpoint))}" if isinstance(checkpoint, dict)
             else type(checkpoint).__name__))
    state = {(k[len(PREFIX):] if isinstance(k, str) and k.startswith(PREFIX) else k): v
             for k, v in checkpoint["state_dict"].items()}
    return state, checkpoint.get("epoch")


def _some(keys: list) -> str:
    more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
    return f"{keys[0]!r}{more}"


def check_layout(state: dict, path: str, arch: str, model) -> None:
    """Every key of the original's ``arch`` model, with its shape, and no other key."""
    expected = original_layout(model, arch)
    if set(state) != set(expected):
        other = next(a for a in ARCHS if a != arch)
        if set(state) == set(original_layout(build_model(other), other)):
            raise UsageError(f"{path} holds the original's {other} model, not {arch}; "
                             f"run again with --arch {other}")
        unexpected = sorted(map(str, set(state) - set(expected)))
        if unexpected:
            raise UsageError(f"{path}: unexpected key {_some(unexpected)} for the original's "
                             f"{arch}; {OTHER_NET_PARAMS}")
        missing = sorted(set(expected) - set(state))
        raise UsageError(f"{path}: the state_dict lacks {_some(missing)} of the original's "
                         f"{arch}; {OTHER_NET_PARAMS}")
    for key, shape in expected.items():
        t = state[key]
        check(isinstance(t, torch.Tensor) and t.is_floating_point(),
              f"{path}: {key} is not a floating-point tensor but {type(t).__name__}; "
              f"the file is damaged or not the original's")
        check(tuple(t.shape) == shape,
              f"{path}: {key} has shape {tuple(t.shape)} but the original's {arch} has "
              f"{shape}; {OTHER_NET_PARAMS}")


def convert(state: dict, model, arch: str) -> dict:
    """The original's state_dict (checked by check_layout) -> a state_dict of ``model``."""
    converted = {}
    for theirs, mine in BLOCKS.items():
        for name in ("weight", "bias"):
            converted[f"{mine}.{name}"] = own(state[f"{theirs}.{name}"])
    for theirs, mine in CELLS.items():
        prefix = theirs + "."
        cell_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        for key, t in convert_cell(cell_state, model.get_submodule(mine), arch).items():
            converted[f"{mine}.{key}"] = t
    return converted


def parse_args(argv):
    parser = ArgumentParser(description="Convert a checkpoint of the original "
                                        "ConvLSTM-PyTorch repo into this repo's format.")
    parser.add_argument("checkpoint", metavar="ORIGINAL",
                        help="the original's checkpoint_<epoch>_<val_loss>.pth.tar")
    parser.add_argument("--arch", required=True, choices=ARCHS,
                        help="the original's model: convlstm or convgru (its net_params.py)")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="the checkpoint to write; must not exist yet")
    parser.add_argument("--num-digits", type=int, nargs="+", default=[3], metavar="K",
                        help="digits per sequence to record in the config, which evaluation "
                             "reads (default: 3, as the original trained)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    check(not out.is_dir(), f"--out {out} is a directory; name a file, e.g. {out / 'converted.pt'}")
    check(not out.exists(), f"--out {out} exists; remove it or choose another name")
    check(all(k >= 1 for k in args.num_digits),
          f"--num-digits takes counts >= 1, got {args.num_digits}")
    state, epoch = read_original(args.checkpoint)
    preset = get_preset(args.arch)
    model = build_model(preset)
    check_layout(state, args.checkpoint, args.arch, model)
    converted = convert(state, model, args.arch)
    model.load_state_dict(converted)  # strict: every tensor of ours is filled, nothing else
    config = {
        "arch": args.arch,
        "model": preset.to_dict(),
        "frames_input": preset.frames_input,
        "frames_output": preset.frames_output,
        "num_digits": list(args.num_digits),
        "data_root": DEFAULT_DATA_ROOT,
        "seed": 0,
    }
    atomic_save({"model": converted, "config": config, "epoch": epoch,
                 "converted_from": str(args.checkpoint)}, out)
    print(f"wrote {out}: the original's {args.arch} from epoch {epoch}, "
          f"as this repo's {args.arch} preset")


if __name__ == "__main__":
    sys.exit(run_cli(main))
