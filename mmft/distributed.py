"""torch.distributed glue for torchrun: rank/world, device per rank, DDP wrapping, rank-0 I/O helpers.

Under `torchrun` the process group is initialised from the usual environment variables (NCCL on GPUs,
gloo on CPU). Without them everything degrades to a single process and these helpers are no-ops.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.distributed as dist

log = logging.getLogger("mmft.distributed")


def init_from_env() -> bool:
    """Initialise the default process group when launched by torchrun; True when distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if dist.get_rank() > 0:  # rank 0 speaks for the run; the others report only problems
        logging.getLogger("mmft").setLevel(logging.WARNING)
    return dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    """"auto" -> the GPU when one is visible, else the CPU; any other name as torch.device(name)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_for_rank(device: torch.device) -> torch.device:
    """One GPU per local rank under torchrun."""
    if device.type == "cuda" and device.index is None and dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over the trainable (LoRA and unfrozen) parameters only."""
    _, world = rank_world()
    if world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Frozen parameters have requires_grad=False, so DDP leaves them out of its reducer.
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (a float); the value itself when single-process."""
    if rank_world()[1] <= 1:
        return float(value)
    t = value.detach().float().reshape(1).clone()
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def gather_objects(obj):
    """All ranks' copies of `obj` as a list (rank order); `obj` itself when single-process."""
    _, world = rank_world()
    if world <= 1:
        return obj
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if rank_world()[1] <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_resume_world(saved_world: int, saved_accum: int, world: int, tcfg) -> bool:
    """Resuming on another world size: keep the global batch through gradient accumulation, and warn.

    Returns True when the world size is unchanged (then per-rank data positions and RNG carry over).
    """
    if saved_world == world:
        return True
    global_accum = saved_accum * saved_world
    if global_accum % world:
        raise ValueError(
            f"the checkpoint was written by {saved_world} processes with train.accum_steps={saved_accum}; "
            f"{world} processes cannot keep that global batch "
            f"(it needs accum_steps * world_size = {global_accum})"
        )
    new_accum = global_accum // world
    tcfg.accum_steps = new_accum
    if rank_world()[0] > 0:
        return False
    warnings.warn(
        f"resuming a {saved_world}-process run on {world} processes: train.accum_steps {saved_accum} -> "
        f"{new_accum} keeps the global batch; the current epoch restarts in a different data order",
        stacklevel=2,
    )
    return False


def progress(total: int, initial: int = 0, enabled: bool = True):
    """A tqdm bar on rank 0 (step, loss, samples/s, ETA); a silent stand-in elsewhere."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=1.0)
