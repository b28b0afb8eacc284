"""Multi-process training with torch.distributed, launched by torchrun (one process per GPU, or per CPU slice).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each worker's environment; `setup` reads
them and joins the process group (NCCL for CUDA, gloo on the CPU). Without them, or with a
world of one, nothing is initialised: a single process runs exactly as before, with no
process group and no collective calls.

The engine and the diffusion task keep every rank's random streams identical (same seed, same draws for the
whole global batch) and lets each rank take its own slice of the batch, so a run on W
ranks of batch B equals a single-process run of batch W x B up to float reduction order.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from difftrain.config import ConfigError

# The longest a rank waits in a collective while rank 0 validates, draws grids or writes a
# checkpoint. A rank that dies does not make the others wait this long: torchrun stops the
# whole job as soon as one worker exits with an error.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank in [0, size), local_rank on its node, the backend (None alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, samples and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: collectives are needed."""
        return self.size > 1


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def world_from_env() -> World:
    if not under_torchrun():
        return World()
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's process group (once per process) and pick this rank's device.

    CUDA: NCCL, and rank r on its node uses cuda:LOCAL_RANK (cuda:0 when each process sees one GPU). CPU: gloo.
    Returns (World(), device) unchanged when not launched by torchrun or when the world has one process.
    """
    world = world_from_env()
    if not world.active:
        return world, device
    if device.type == "cuda":
        if device.index not in (None, world.local_rank):
            raise ConfigError(f"train.device={device} under torchrun: use train.device=cuda (each rank takes "
                             f"cuda:LOCAL_RANK; this is local rank {world.local_rank})")
        gpus = torch.cuda.device_count()  # 1: a scheduler gave each process its own GPU (CUDA_VISIBLE_DEVICES)
        if gpus > 1 and world.local_rank >= gpus:
            raise ConfigError(f"local rank {world.local_rank} has no GPU: this machine has {gpus}; start at most "
                              f"that many processes per node (torchrun --nproc_per_node, train.devices)")
        device = torch.device("cuda", world.local_rank if gpus > 1 else 0)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    return World(world.rank, world.size, world.local_rank, dist.get_backend()), device


def cleanup() -> None:
    """Leave the process group (after the last collective), so the process exits without warnings."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every rank (e.g. until rank 0 has finished writing a file)."""
    if world.active:
        dist.barrier()


def all_gather(world: World, x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` (same shape everywhere), concatenated along dim 0 in rank order."""
    if not world.active:
        return x
    out = [torch.empty_like(x) for _ in range(world.size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def gather_losses(world: World, losses: torch.Tensor, stop_requested: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's per-sample losses (W x B,) and whether any rank got a stop signal, in one all-gather."""
    flag = torch.full((1,), float(stop_requested), device=losses.device)
    gathered = all_gather(world, torch.cat([losses.float(), flag])).view(world.size, len(losses) + 1)
    return gathered[:, :-1].reshape(-1), gathered[:, -1].max()


def world_change_warning(source: str, saved_world: int, world: World, batch_size: int, data: dict, lr_change: str) -> str:
    """What changes when a checkpoint written by `saved_world` processes is resumed by `world`."""
    return (f"'{source}' was written by {saved_world} process(es), this run has {world.size}: "
            f"global batch {batch_size * saved_world} -> {batch_size * world.size}{lr_change}; the data "
            f"continue at epoch {data['epoch']} image {data['offset']} in global batches of the new size; "
            f"every rank continues from rank 0's random state. Weights, EMAs, optimizer and step are kept.")


def gather_objects(world: World, obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank (used for the per-rank RNG states)."""
    if not world.active:
        return [obj]
    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def describe(world: World, batch_size: int, microbatch: int) -> str:
    """The start-up line rank 0 prints: world size, batch per rank, micro-batches, global batch, backend."""
    micro = microbatch if 0 < microbatch < batch_size else batch_size
    pieces = -(-batch_size // micro)
    return (f"difftrain: distributed: world size {world.size} ({world.backend}), batch {batch_size} per rank "
            f"in {pieces} micro-batch(es) of {micro}, global batch {batch_size * world.size}")


def print_main(world: World, *args, **kwargs) -> None:
    if world.main:
        print(*args, file=sys.stderr, **kwargs)
