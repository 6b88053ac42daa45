"""The training step: the loss, the gradient scaler and one optimisation step under autocast.

main.py trains with it, tools/bench.py times it and tools/amp_check.py compares precisions
with it, so all three run the same step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nowcast import BALANCE_THRESHOLDS, BALANCE_WEIGHTS, balanced_loss

LOSSES = ("mse", "mse+l1", "b-mse", "b-mse+b-mae")


def loss_fn(pred: torch.Tensor, targets: torch.Tensor, loss: str = "mse", balance=None) -> torch.Tensor:
    """Per-pixel MSE, plus per-pixel L1 for "mse+l1" (their sum, as several papers train).

    "b-mse" and "b-mse+b-mae" weight each pixel by the truth's bin (Shi et al. 2017,
    nowcast.balanced_loss): `balance` is (thresholds, weights) on the training scale [0, 1]
    (main.py maps --balance-thresholds there); None is HKO-7's bins as they are.
    """
    pred = pred.float()
    if loss.startswith("b-"):
        thresholds, weights = balance or (BALANCE_THRESHOLDS, BALANCE_WEIGHTS)
        return balanced_loss(pred, targets, thresholds, weights, mae=loss == "b-mse+b-mae")
    value = F.mse_loss(pred, targets)  # the mean over pixels: no second division by B
    if loss == "mse+l1":
        value = value + F.l1_loss(pred, targets)
    return value


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that scales only for fp16: bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def train_step(model, optimizer, scaler, inputs, targets, amp_ctx, clip: float = 10.0,
               loss: str = "mse", balance=None) -> torch.Tensor:
    """One optimisation step on a batch (B, T_in, C, H, W) -> (B, T_out, C, H, W), values on
    the network's scale [0, 1]; `loss` and `balance` as loss_fn takes them.

    Returns the loss as a detached tensor: the caller decides when to sync with .item().
    """
    with amp_ctx:
        pred = model(inputs, frames_output=targets.shape[1])
    value = loss_fn(pred, targets, loss, balance)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(value).backward()
    scaler.unscale_(optimizer)
    if clip != float("inf"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
    return value.detach()
