"""The learning-rate schedule: its shape, its length fitted to --time-budget, and a new length on resume.

`lr_factor` is the LR as a share of the peak --lr at each step. Its length is --epochs,
or, for a new onecycle or cosine run with --time-budget and no --epochs, what fits the
budget on this machine (main.fit_to_budget drives it):

1. `calibrate` times, on a throw-away start that main.py then undoes (weights and RNG
   states back, a fresh optimizer), one warm-up step, rounds of CALIBRATION_STEPS
   training steps until 2% of the budget has passed (5 to 60 s; a step takes the median
   round's time), a validation of VAL_BATCHES batches after one warm-up batch, and one
   checkpoint written to memory. So the run trains exactly as one started with --epochs
   set to the fitted value.
2. `fit_length` takes the most epochs whose steps, validations and checkpoints end inside
   what is left of the budget, less SAFETY for what calibration can't see (DataLoader
   start-ups, logging, a machine that slows down). Where the epoch's size is free (Moving
   MNIST without --epoch-size), it then sizes the epochs to fill the budget. Otherwise at
   least 1: a budget too short for one epoch stops it mid-way, and a warning says so.
   Where the preset names a lighter one and fewer than its `lighter_below` steps fit,
   main.py times and fits that one instead (net_params.Preset.lighter).
3. main.py records the result in config["epochs"], config["epoch_size"] and
   config["fitted"], which config.json and every checkpoint carry, so --resume continues
   the very same schedule.
4. After each epoch, `shorten` ends the schedule sooner, at the last step that fits,
   where the machine has slowed so much that the steps left won't end inside the budget
   (recorded the same way, with config["total_steps"]).

A onecycle or cosine shape can't stretch: a resumed run whose --epochs changed goes on
from its LR at that step down to the schedule's final value at the new end, along a half
cosine (`reanchor`, recorded in config["anneal"]).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

DECAYING = ("onecycle", "cosine")  # schedules with an end, and so a length to fit
CALIBRATION_STEPS = 8  # timed training steps a round, after one warm-up step
CALIBRATION_ROUNDS = 16  # at most
CALIBRATION_SHARE, CALIBRATION_SECONDS = 0.02, (5.0, 60.0)  # rounds until 2% of the budget, in bounds
VAL_BATCHES = 3        # timed validation batches, after one warm-up batch
SAFETY = 0.05          # share of the remaining budget held back
CHECKPOINTS_PER_EPOCH = 2  # last.pt, and best.pt whenever the epoch is the best so far


def lr_factor(schedule: str, warmup: float, step: int, total: int, anneal: dict | None = None) -> float:
    """The LR as a share of the peak --lr after `step` optimizer steps of `total`.

    `anneal` ({"step", "factor"}, from `reanchor`) replaces the shape from its step on by a
    half cosine from its factor down to the shape's final value at `total`.
    """
    if anneal is not None and step >= anneal["step"]:
        end = lr_factor(schedule, warmup, total, total)
        left = total - anneal["step"]
        done = min((step - anneal["step"]) / left, 1.0) if left > 0 else 1.0
        return end + (anneal["factor"] - end) * (1 + math.cos(math.pi * done)) / 2
    progress = min(step / max(total, 1), 1.0)
    if schedule == "onecycle":  # Smith & Topin 2019: cosine up from peak/25, down to peak/25e4
        if progress < warmup:
            return 1 / 25 + (1 - 1 / 25) * (1 - math.cos(math.pi * progress / warmup)) / 2
        down = (progress - warmup) / (1 - warmup)
        return 1 / 25e4 + (1 - 1 / 25e4) * (1 + math.cos(math.pi * down)) / 2
    if progress < warmup:  # cosine: linear warm-up from 0, then a half cosine to 0
        return (step + 1) / (warmup * total + 1)
    return (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup))) / 2


def reanchor(config: dict, previous: dict, step: int, steps_per_epoch: int) -> str | None:
    """A resumed run's --epochs differs from `previous` (the checkpoint's config): for
    onecycle and cosine, from `step` on the LR goes from its value there down to the
    schedule's final value at the new end. Records config["anneal"]; returns the line that
    says so, or None where nothing changes (same length, or plateau, which has no end)."""
    if config["schedule"] not in DECAYING or config["epochs"] == previous["epochs"]:
        return None
    schedule, warmup = config["schedule"], config["warmup"]
    now = lr_factor(schedule, warmup, step, schedule_steps(previous, steps_per_epoch), previous.get("anneal"))
    config.pop("total_steps", None)  # a shortened schedule's end gives way to the new --epochs
    total = config["epochs"] * steps_per_epoch
    lr_now, lr_end = anneal_from(config, step, now, total)
    return (f"--epochs {config['epochs']} instead of {previous['epochs']}: a {schedule} schedule "
            f"can't stretch, so the LR goes from {lr_now:.3g} at step {step} down to "
            f"{lr_end:.3g} at step {total}")


def anneal_from(config: dict, step: int, factor: float, total: int) -> tuple[float, float]:
    """Record in config["anneal"] that from `step` on the LR goes from `factor` of its peak
    down to the schedule's final value at step `total`, along a half cosine (lr_factor);
    returns the LR at both ends."""
    config["anneal"] = {"step": step, "factor": factor}
    end = lr_factor(config["schedule"], config["warmup"], total, total)
    return factor * config["lr"], end * config["lr"]


# ----------------------------------------------------------------------------------------
# Fitting the length to the budget


@dataclass
class Speed:
    """What calibration measured, in seconds."""
    step: float        # one training step
    validation: float  # one validation of the whole set
    checkpoint: float  # one checkpoint written (to memory: the disk adds little)

    def epoch(self, steps_per_epoch: int) -> float:
        return steps_per_epoch * self.step + self.validation + CHECKPOINTS_PER_EPOCH * self.checkpoint


def calibration_seconds(seconds_left: float) -> float:
    """How long to time training steps: CALIBRATION_SHARE of the budget, within bounds."""
    return min(max(CALIBRATION_SHARE * seconds_left, CALIBRATION_SECONDS[0]), CALIBRATION_SECONDS[1])


def calibrate(train_steps, validate, val_batches: int, save, sync, seconds: float = 0.0) -> Speed:
    """Time this machine: `train_steps(n)` runs n training steps, `validate(n)` validates
    n batches, `save()` writes a checkpoint, `sync()` waits for the device's queued work;
    `val_batches` is the size of a whole validation in batches. The first step and the
    first batch only warm up (allocations, cuDNN autotuning, torch.compile's graphs).
    Steps run in rounds of CALIBRATION_STEPS until `seconds` have passed (at most
    CALIBRATION_ROUNDS rounds), and a step takes the median round's time: a few seconds of
    a shared CPU are off by 15% either way, and one round that another process slowed
    would otherwise end the schedule minutes early."""
    train_steps(1)
    sync()
    t0 = time.time()
    rounds = []  # seconds a step, round by round
    while len(rounds) < CALIBRATION_ROUNDS:
        start = time.time()
        train_steps(CALIBRATION_STEPS)
        sync()
        rounds.append((time.time() - start) / CALIBRATION_STEPS)
        if time.time() - t0 >= seconds:
            break
    validate(1)
    sync()
    t2 = time.time()
    validate(VAL_BATCHES)
    sync()
    t3 = time.time()
    save()
    t4 = time.time()
    return Speed(step=statistics.median(rounds),
                 validation=(t3 - t2) / VAL_BATCHES * val_batches, checkpoint=t4 - t3)


def fit_epochs(speed: Speed, steps_per_epoch: int, seconds_left: float) -> int:
    """The most epochs that end inside `seconds_left`, SAFETY held back (0 if none does)."""
    return max(0, math.floor(seconds_left * (1 - SAFETY) / speed.epoch(steps_per_epoch)))


def fit_length(speed: Speed, steps_per_epoch: int, seconds_left: float,
               free_epoch_size: bool) -> tuple[int, int, bool]:
    """(epochs, steps per epoch, whether the schedule ends inside the budget).

    The epochs are fit_epochs' count (at least 1). Where the epoch's size is free (Moving
    MNIST without --epoch-size: sequences are made on the fly), the steps per epoch then
    grow, or shrink where not even one epoch fits, so that the schedule fills the budget
    instead of leaving up to an epoch of it unused: a quarter of the 15 minutes on a slow CPU
    that fits 2.7 epochs of the preset's size.
    """
    fits = fit_epochs(speed, steps_per_epoch, seconds_left)
    epochs = max(fits, 1)
    if not free_epoch_size:
        return epochs, steps_per_epoch, fits > 0
    per_epoch = seconds_left * (1 - SAFETY) / epochs - speed.epoch(0)  # less validation, checkpoints
    steps = math.floor(per_epoch / speed.step) if speed.step > 0 else steps_per_epoch
    if steps < 1:  # not even a one-step epoch fits: keep the size, the budget stops it
        return epochs, steps_per_epoch, False
    return epochs, steps, True


def fitted_record(speed: Speed, epochs: int, steps_per_epoch: int, seconds_left: float) -> dict:
    """config["fitted"]: what the fit measured and the length it chose (fit_length's)."""
    return {"epochs": epochs, "steps_per_epoch": steps_per_epoch,
            "seconds_left": round(seconds_left, 1),
            **{f"{key}_seconds": round(value, 4) for key, value in asdict(speed).items()}}


def fit_message(config: dict, record: dict, fits: bool, resized: bool = False) -> str:
    """The line a fitted run logs; `fits`: the schedule ends inside the budget; `resized`:
    the fit chose the epoch's size too (config["epoch_size"])."""
    epochs = record["epochs"]
    size = f"{config['epoch_size']:,} sequences; " if resized else ""
    line = (f"fitted the schedule to the budget: {epochs} epoch{'s' * (epochs > 1)} of "
            f"{record['steps_per_epoch']} steps ({size}{record['step_seconds']:.3g} s a step, "
            f"{record['validation_seconds']:.3g} s a validation; "
            f"{record['seconds_left'] / 60:.3g} of {config['time_budget']:g} min left)")
    if not fits:
        line += ("; not even one epoch fits, so the budget will stop it mid-way: raise "
                 "--time-budget, or lower --epoch-size or --val-size")
    return line


def shorten(config: dict, epochs_done: int, steps_per_epoch: int, epoch_seconds: float,
            seconds_left: float) -> str | None:
    """After an epoch of a fitted run: where the steps left won't end inside the budget at
    the pace of the epoch just run (a shared machine that slowed down after calibration),
    the schedule ends at the last step that does, instead of being cut mid-way with its LR
    high; the last epoch then stops at that step and validates. Still in the warm-up, the
    shape just gets shorter; past it, the LR goes from its value now down to the final
    value at the new end, as after a new --epochs on resume (`reanchor`). Records
    config["total_steps"], config["epochs"] (and config["anneal"]) and
    config["fitted"]["shortened"]; returns the line that says so, or None where the rest
    fits, or where not even one more step would (the budget then stops it)."""
    old_total = schedule_steps(config, steps_per_epoch)
    step = epochs_done * steps_per_epoch
    usable = seconds_left * (1 - SAFETY)
    fixed = config["fitted"]["validation_seconds"] + CHECKPOINTS_PER_EPOCH * config["fitted"]["checkpoint_seconds"]
    step_seconds = max(epoch_seconds - fixed, 1e-9) / steps_per_epoch
    whole = math.floor(usable / epoch_seconds) if epoch_seconds > 0 else 0
    rest = usable - whole * epoch_seconds  # a last, shorter epoch: its steps and a validation
    more = whole * steps_per_epoch + min(max(math.floor((rest - fixed) / step_seconds), 0), steps_per_epoch - 1)
    if config["schedule"] not in DECAYING or not 1 <= more < old_total - step:
        return None
    warmup, anneal = config["warmup"], config.get("anneal")
    now = lr_factor(config["schedule"], warmup, step, old_total, anneal)
    total = config["total_steps"] = step + more
    config["epochs"] = epochs_done + math.ceil(more / steps_per_epoch)
    if anneal is None and step < warmup * total:
        how = f"still warming up, the {config['schedule']} shape is {total:,} steps long instead of {old_total:,}"
    else:
        lr_now, lr_end = anneal_from(config, step, now, total)
        how = f"the LR goes from {lr_now:.3g} now down to {lr_end:.3g} at its end"
    config["fitted"]["shortened"] = {"after_epoch": epochs_done, "total_steps_before": old_total,
                                     "epoch_seconds": round(epoch_seconds, 2)}
    last = total - (config["epochs"] - 1) * steps_per_epoch
    part = f" ({last} of its {steps_per_epoch} steps)" if last < steps_per_epoch else ""
    return (f"this machine slowed since its calibration: at {epoch_seconds:.3g} s an epoch, the "
            f"{old_total - step:,} steps left won't end inside the {seconds_left / 60:.3g} min that "
            f"remain, so the schedule now ends at step {total:,}, in epoch {config['epochs']}{part}, "
            f"instead of step {old_total:,}; {how}")


def schedule_steps(config: dict, steps_per_epoch: int) -> int:
    """The schedule's length in steps: its epochs', or where `shorten` ended it inside an
    epoch, config["total_steps"]."""
    return config.get("total_steps") or config["epochs"] * steps_per_epoch


def budget_warning(config: dict, epoch_seconds: float, seconds_left: float, epochs_done: int) -> str | None:
    """After the first epoch of a run with --epochs and --time-budget (onecycle, cosine):
    the line that says the rest won't end inside the budget, naming the epoch count that
    would; None where it will."""
    left = config["epochs"] - epochs_done
    if config["schedule"] not in DECAYING or left * epoch_seconds <= seconds_left:
        return None
    fits = epochs_done + math.floor(seconds_left * (1 - SAFETY) / epoch_seconds)
    return (f"warning: --epochs {config['epochs']} won't end inside --time-budget "
            f"{config['time_budget']:g}: at {epoch_seconds:.3g} s an epoch, the {left} left need "
            f"{left * epoch_seconds / 60:.3g} min and {seconds_left / 60:.3g} remain, so the budget "
            f"will cut the {config['schedule']} schedule short; {fits} epoch{'s' * (fits != 1)} would fit (leave "
            f"--epochs out and the schedule fits itself to the budget)")
