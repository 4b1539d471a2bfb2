"""DDP bookkeeping for the trainer: ranks, world size, buffer synchronisation."""

from __future__ import annotations

import os

import torch
import torch.nn as nn


class _Dist:
    """Rank / world of this process; a process group is set up under torchrun (WORLD_SIZE > 1)."""

    def __init__(self, use_cuda: bool) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.backend = None
        if self.enabled and not torch.distributed.is_initialized():
            self.backend = "nccl" if use_cuda else "gloo"
            if use_cuda:
                torch.cuda.set_device(self.local_rank)
            else:
                # gloo ranks on one host share its cores: split them instead of oversubscribing.
                local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
            torch.distributed.init_process_group(backend=self.backend)
        elif self.enabled:
            self.backend = torch.distributed.get_backend()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.enabled and self.backend is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def sync_buffers_from_rank0(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics, ...) to every rank; no-op without DDP.

    DDP broadcasts buffers at the start of each training forward, after which every rank updates its
    BatchNorm statistics with its own crops: without this, each rank would validate a slightly
    different model, none of them the one rank 0 saves.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() < 2:
        return
    for buf in model.buffers():
        torch.distributed.broadcast(buf, src=0)
