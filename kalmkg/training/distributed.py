"""Training across processes (torchrun / accelerate launch): who this process is, and the few
collective operations the loop needs.

Every process takes its slice of the same global batch, embeddings are all-gathered with gradients
(`gather`) so every process contrasts against the whole batch, and gradients are averaged
(`average_gradients`): the update equals the single-process update on that batch. With one
process every function here is a no-op and torch.distributed is never touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

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
        return World()
    import torch
    import torch.distributed as dist

    if device_type == "cuda":
        # before the group starts: NCCL binds each process to its current device, which is otherwise GPU 0
        # for every process of the node
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def gather(x, world: World):
    """All-gather along dim 0 keeping gradients (each process's slice gets the sum of all grads)."""
    if world.size == 1:
        return x
    import torch
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def average_gradients(parameters: Iterable, world: World) -> None:
    """Mean of every process's gradients, in place."""
    if world.size == 1:
        return
    import torch.distributed as dist

    for p in parameters:
        if p.requires_grad and p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world.size


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

    # NCCL moves only CUDA tensors
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())
