"""torchrun plumbing for main.py: process group, sums and agreement over processes, rank 0 first.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them there is one process, and
every helper here is a no-op that returns its input.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from devices import pick_device
from utils import UsageError


_FLAGS = None  # a gloo group for per-step flags: on CPU, so agreeing never waits for the GPU


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). nccl on CUDA, gloo on CPU."""
    global _FLAGS
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _FLAGS = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return dist.get_rank(), world, device


def close_distributed(clean: bool = True) -> None:
    """Leave the process group, if one was joined: once every process got here if `clean`;
    at once after an error that other processes may not share (they would wait forever)."""
    global _FLAGS
    if dist.is_initialized():
        # The DDP wrapper sits in reference cycles; free it while its process group
        # lives, or its threads die at interpreter exit.
        gc.collect()
        if clean:
            dist.barrier()
        dist.destroy_process_group()
        _FLAGS = None


def parallel(model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """The model wrapped in DistributedDataParallel under torchrun, else as it is."""
    if world == 1:
        return model
    return DDP(model, device_ids=[device] if device.type == "cuda" else None)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a no-op in one process). Handles nccl's need for device tensors."""
    if not dist.is_initialized():
        return t
    backend_device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    out = t.to(backend_device)
    dist.all_reduce(out)
    return out.to(t.device)


def agree(*flags: bool):
    """Each flag is true on every process if it is true on any (a no-op in one process)."""
    total = all_sum(torch.tensor([float(f) for f in flags], dtype=torch.float64))
    result = [bool(v > 0) for v in total.tolist()]
    return result[0] if len(result) == 1 else result


def agree_max(value: int) -> int:
    """The largest of the processes' values (a no-op in one process). Cheap enough for
    every step: a CPU all-reduce of one number, which never syncs the GPU."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_FLAGS)
    return int(t.item())


def rank0_first(rank: int, fn, *args):
    """fn on rank 0 first (it may download), then on the others. A UsageError or OSError
    on rank 0 reaches every rank, so that none waits for it forever."""
    if not dist.is_initialized():
        return fn(*args)
    result, error = None, None
    if rank == 0:
        try:
            result = fn(*args)
        except (UsageError, OSError) as e:
            error = e
    shared = [None if error is None else str(error)]
    dist.broadcast_object_list(shared, src=0)
    if error is not None:
        raise error
    if shared[0] is not None:
        raise UsageError(shared[0])
    return result if rank == 0 else fn(*args)


def broadcast(value, rank: int):
    """Rank 0's value on every rank."""
    if not dist.is_initialized():
        return value
    shared = [value if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
