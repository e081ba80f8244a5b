"""Sharded runs under torch's launcher: ``torchrun --nproc-per-node K -m bench run ...``.

Each process generates the batches ``k`` with ``k % world_size == rank`` and writes them as shards into the shared
output folder; rank 0 waits for all of them, computes the metrics once over every sample and alone records the
MLflow run. Per-sample seeds (bench.denoiser.sample_seed) and batches numbered by index make the samples
byte-identical to a one-process run with the same batch size, whatever the number of processes.

The process group only synchronises (the samples travel through the output folder, which processes on several
machines must share), so it is gloo on every device: no NCCL communicator is needed for a barrier. On CUDA each
process takes the GPU of its ``LOCAL_RANK``. ``accelerate launch`` sets the same environment variables as torchrun
and works the same way.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from bench.errors import BenchError

# rank 0 may train (Method.prepare) or evaluate while the others wait; a crashed process ends the whole job through
# torchrun, so the barrier needs no short timeout
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Shards:
    """This process's place in a sharded run (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def mine(self, batches: range) -> list[int]:
        """The batches this process generates: every ``world_size``-th, so that all finish at about the same time."""
        return [k for k in batches if k % self.world_size == self.rank]

    def barrier(self) -> None:
        """Wait for every process; polls, so that a signal (SIGTERM from torchrun) is handled while waiting."""
        if self.world_size == 1:
            return

        work = dist.barrier(async_op=True)
        while not work.is_completed():
            time.sleep(0.05)
        work.wait()

    def close(self) -> None:
        if self.world_size > 1:
            if dist.is_initialized():
                dist.destroy_process_group()


def from_environment(device: str) -> Shards:
    """The process group of torchrun / accelerate launch (WORLD_SIZE > 1), or a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Shards()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))

    if device.startswith("cuda:"):
        raise BenchError(f"--device {device} in a sharded run: use --device cuda (each process takes the GPU of its "
                         f"LOCAL_RANK)")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # "cuda" now means this process's GPU
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return Shards(rank, world_size, local_rank)
