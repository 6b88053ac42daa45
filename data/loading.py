"""Training data set-up: the datasets a run's config names, checked before any work, each
epoch's sample order across processes, and the DataLoaders that serve every epoch."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from data.arrays import SequenceArrayDataset, check_values, open_sequences, split_holdout
from data.mm import MovingMNIST
from model import frame_size, total_stride
from net_params import Preset
from stopping import Loader, ignore_stop_signals
from utils import check


def open_train_data(config: dict, guess_layout: bool = True):
    """--train-data opened in its layout (data.arrays.Opened), its values not read yet."""
    return open_sequences(config["train_data"], config["layout"], guess_layout=guess_layout)


def check_train_shape(opened, config: dict, preset: Preset, fitted: bool = False) -> None:
    """The sequences are long enough and the frames pass the preset's strides; `fitted`:
    they are also the ones the run's model was fitted to (a run that started)."""
    _, T, C, H, W = opened.sequences.shape
    fi, fo = config["frames_input"], config["frames_output"]
    check(min(H, W) >= 7, f"--train-data frames are {H}x{W}; SSIM needs at least 7x7")
    stride = total_stride(preset)
    check(H % stride == 0 and W % stride == 0,
          f"--train-data frames are {H}x{W}, but the preset's stages downsample by {stride}; "
          f"crop them to a multiple of {stride}")
    check(fi + fo <= T, f"--train-data {opened.name}: {fi} input + {fo} output frames "
                        f"(--frames-input, --frames-output) don't fit in sequences of {T} frames; "
                        f"lower them, or check --layout ({opened.layout}: T is axis "
                        f"{opened.layout.index('T') + 1})")
    if fitted:
        # Runs of versions before --layout fitted only the channels; their image_size is the preset's.
        want = frame_size(preset) if config["layout"] is not None else (H, W)
        check((C, H, W) == (preset.frame_channels, *want),
              f"--train-data {opened.name} holds frames of {C}x{H}x{W} (CxHxW) but this run's "
              f"model was fitted to {preset.frame_channels}x{want[0]}x{want[1]}; resume with "
              f"that data, or start a new run")


def make_datasets(config: dict, warn: bool = True) -> tuple[Dataset, Dataset]:
    """Training and validation sets; every problem with the data is a UsageError here.
    `warn`: say how many values --value-range clips (rank 0 says it for all)."""
    fi, fo = config["frames_input"], config["frames_output"]
    model = config["model"]
    if config["train_data"]:
        opened = open_train_data(config)
        check_train_shape(opened, config, Preset.from_dict(model), fitted=True)
        check_values(opened.raw, opened.name, config["value_range"], config["fill_nan"], warn=warn)
        train_idx, val_idx = split_holdout(len(opened.sequences), config["holdout_fraction"])
        if config.get("dry_run"):
            train_idx, val_idx = train_idx[:config["epoch_size"]], val_idx[:config["val_size"]]
        units = dict(value_range=config["value_range"], fill_nan=config["fill_nan"])
        return (SequenceArrayDataset(opened.sequences, fi, fo, indices=train_idx, **units),
                SequenceArrayDataset(opened.sequences, fi, fo, indices=val_idx, **units))
    root = Path(config["data_root"])
    check(not root.exists() or root.is_dir(),
          f"--data-root {root} is a file; name the folder that holds the MNIST files")
    common = dict(n_frames_input=fi, n_frames_output=fo, num_objects=config["num_digits"],
                  seed=config["seed"], image_size=model["image_size"],
                  download=not config["no_download"])
    train = MovingMNIST(config["data_root"], True, length=config["epoch_size"], **common)
    val = MovingMNIST(config["data_root"], False, length=config["val_size"], **common)
    return train, val


def data_frame_size(dataset: Dataset) -> tuple[int, int]:
    """(H, W) of the dataset's frames; Moving MNIST's without drawing a sequence."""
    if isinstance(dataset, MovingMNIST):
        return dataset.image_size, dataset.image_size
    return tuple(dataset[0][0].shape[-2:])


def epoch_order(dataset: Dataset, config: dict, epoch: int):
    """An epoch's samples in step order. A Moving MNIST sample is a function of (seed, epoch,
    index): the sampler yields (epoch, index), which persistent workers read too, made on
    demand so that an epoch of any --epoch-size takes no memory. A fixed array is shuffled
    by a generator keyed on (seed, epoch)."""
    if isinstance(dataset, MovingMNIST):
        return EpochIndices(epoch, len(dataset))
    g = torch.Generator().manual_seed(config["seed"] * 1_000_003 + epoch)
    return torch.randperm(len(dataset), generator=g).tolist()


class EpochIndices:
    """(epoch, 0), (epoch, 1), ... (epoch, n - 1), as a sequence that stores none of them."""

    def __init__(self, epoch: int, n: int):
        self.epoch, self.n = epoch, n

    def __len__(self):
        return self.n

    def __getitem__(self, i: int):
        return (self.epoch, i)


class EpochSampler:
    """This process's samples of the current epoch, from `start` on; one DataLoader (and its
    workers) serves all epochs.

    Step s covers positions start + s*B*world ... of `order`, and rank r takes the r-th
    slice of B. So N processes of batch B see exactly the sequences that one process of
    batch N*B sees.
    """

    def __init__(self):
        self.order, self.start, self.batch, self.rank, self.world = [], 0, 1, 0, 1

    def set(self, order, start: int, batch: int, rank: int, world: int) -> None:
        self.order, self.start, self.batch, self.rank, self.world = order, start, batch, rank, world

    def __len__(self):
        return (len(self.order) - self.start) // (self.batch * self.world) * self.batch

    def __iter__(self):
        for step in range(len(self) // self.batch):
            first = self.start + step * self.batch * self.world + self.rank * self.batch
            for j in range(self.batch):
                yield self.order[first + j]


def make_loaders(train_set, val_set, config: dict, device: torch.device, rank: int, world: int):
    """(sampler, training loader, validation loader): one of each for the whole run (made
    again only where the budget's fit resizes the epochs), so workers can persist; the
    sampler holds the current epoch's indices."""
    sampler = EpochSampler()
    workers = config["workers"]
    kw = dict(batch_size=config["batch_size"], num_workers=workers, pin_memory=device.type == "cuda",
              persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals if workers else None)
    val_shard = Subset(val_set, range(rank, len(val_set), world))  # its sums are all-reduced
    return sampler, Loader(train_set, sampler=sampler, **kw), Loader(val_shard, **kw)
