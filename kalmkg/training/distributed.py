"""Training across processes (torchrun / accelerate launch): who this process is, the replicas that keep
the processes' weights equal, and the few collectives the loop needs beside them.

Every process takes its slice of the same global batch, embeddings are all-gathered with gradients
(`gather`) so every process contrasts against the whole batch, and PyTorch's DistributedDataParallel
averages the gradients in buckets while backward runs (`replicate`): the update equals the
single-process update on that batch. The collectives make their tensors on the process's training
device, and `gather`, which takes the caller's, checks it (NCCL moves only CUDA tensors; the CPU tests
run gloo, which would take either), so a tensor on the wrong device fails in the tests and not first on
a GPU node. With one process every
function here is a no-op and torch.distributed is never touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device_type: str = "cpu"  # where the collectives' tensors must be: the training device's type

    @property
    def main(self) -> bool:
        return self.rank == 0

    def slice(self, n: int) -> slice:
        """This process's share of a global batch of n examples (n divisible by the size)."""
        local = n // self.size
        return slice(self.rank * local, (self.rank + 1) * local)


def init_world(device_type: str) -> World:
    """Join the process group that torchrun / accelerate launch describe in the environment."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device_type=device_type)
    import torch
    import torch.distributed as dist

    if device_type == "cuda":
        # before the group starts: NCCL binds each process to its current device, which is otherwise GPU 0
        # for every process of the node
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device_type)


def replicate(module, world: World, device: str):
    """`module` as this process's DistributedDataParallel replica: its weights broadcast from the main
    process once, its gradients averaged over the processes during each backward (call it, not the
    inner module; `no_sync()` for all but the last batch of an accumulated step). The module itself
    with one process."""
    if world.size == 1:
        return module
    import torch
    from torch.nn.parallel import DistributedDataParallel

    where = torch.device(device)
    # some steps leave a weight without gradient (the LM head of an untied model without LM rows, the
    # temperature when fixed): DDP then must look for them instead of waiting for their bucket
    return DistributedDataParallel(module, device_ids=[where.index] if where.type == "cuda" else None,
                                   broadcast_buffers=False, find_unused_parameters=True)


def shard(n: int, world: World) -> tuple[slice, object] | None:
    """For validation across processes (`evaluation.ranking.rank_queries`): this process's share of n
    rows (shares differ by one at most) and the function that joins every process's [share, D] numpy
    array into the [n, D] whole, in order, on every process. None with one process."""
    if world.size == 1:
        return None
    if n < world.size:
        raise ValueError(f"{n} rows cannot be shared by {world.size} processes")
    bounds = [n * i // world.size for i in range(world.size + 1)]

    def join(mine):
        import numpy as np
        import torch
        import torch.distributed as dist

        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        padded = torch.zeros(longest, mine.shape[1], device=_device(world))  # all_gather takes equal shapes
        padded[: len(mine)] = torch.as_tensor(mine, device=padded.device)
        parts = [torch.empty_like(padded) for _ in range(world.size)]
        dist.all_gather(parts, padded)
        return np.concatenate([p[: b - a].cpu().numpy() for p, a, b in zip(parts, bounds[:-1], bounds[1:])])

    return slice(bounds[world.rank], bounds[world.rank + 1]), join


def check_device(x, world: World, what: str) -> None:
    """Refuse a collective on a tensor that is not on the training device."""
    if x.device.type != world.device_type:
        raise RuntimeError(f"{what}: a {x.device.type} tensor in a collective of a {world.device_type} run "
                           "(NCCL moves only CUDA tensors)")


def gather(x, world: World):
    """All-gather along dim 0 keeping gradients (each process's slice gets the sum of all grads)."""
    if world.size == 1:
        return x
    import torch
    from torch.distributed.nn.functional import all_gather

    check_device(x, world, "gather")
    return torch.cat(all_gather(x.contiguous()), dim=0)


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def agree(flag: bool, world: World) -> bool:
    """The main process's decision, made known to every process (e.g. to stop early)."""
    if world.size == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], device=_device(world))
    dist.broadcast(t, src=0)
    return bool(t.item())


def _device(world: World):
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if world.device_type == "cuda" else torch.device("cpu")
