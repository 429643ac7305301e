"""Extraction across the processes PyTorch's own launcher starts (``torchrun``).

``torchrun --nproc-per-node N -m embedpipe extract ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address in each process's environment. The ranks
share only small metadata (file digests, counts), never embeddings: each rank writes its
own crash-safe shards into the shared cache folder, and rank 0 assembles the export.
So the collectives run on gloo over CPU tensors, also on GPU machines, where NCCL is
registered for CUDA tensors should a caller need it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

# Ranks wait at barriers for the slowest one (uneven decode costs, rank 0's export of
# millions of rows); a rank that dies makes torchrun stop the others, so long is safe.
BARRIER_TIMEOUT = timedelta(hours=12)


def launched_world_size() -> int:
    """How many processes the launcher started (1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """True outside torchrun and on rank 0: the process that reports to the user."""
    return os.environ.get("RANK", "0") == "0"


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks, and the few collectives extraction needs."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T], groups: Any = None) -> list[T]:
        """This rank's part of ``items``: every ``world``-th one, so costs spread evenly and no item repeats.

        A numpy array stays an array (a view), so a million row numbers cost no Python objects.

        Args:
            groups: a group id per item (the tar shard each member lives in): whole groups go to
                one rank each, so a rank opens and reads only its own shards, not every shard.
        """
        if groups is None or self.world == 1:
            part = items[self.rank :: self.world]
            return part if hasattr(part, "dtype") else list(part)  # type: ignore[return-value]
        positions = self._group_positions(groups)[self.rank]
        return items[positions] if hasattr(items, "dtype") else [items[i] for i in positions.tolist()]  # type: ignore[return-value]

    def _group_positions(self, groups: Any) -> list[np.ndarray]:
        """Each rank's positions when whole groups are shared out: each group, in the order groups first
        appear, to the rank with the fewest items so far (the same answer on every rank)."""
        _, first, inverse, counts = np.unique(np.asarray(groups), return_index=True, return_inverse=True, return_counts=True)
        owner = np.empty(len(first), dtype=np.int64)
        load = [0] * self.world
        for group in np.argsort(first, kind="stable").tolist():
            rank = load.index(min(load))
            owner[group] = rank
            load[rank] += int(counts[group])
        of_item = owner[inverse.reshape(-1)]
        return [np.flatnonzero(of_item == rank) for rank in range(self.world)]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable, small), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def unshare(self, parts: list[list[T]], total: int, groups: Any = None) -> list[T]:
        """Undo :meth:`share` (with the same ``groups``): the gathered per-rank parts back in the original order."""
        merged: list[T] = [None] * total  # type: ignore[list-item]
        if groups is None or self.world == 1:
            for rank, part in enumerate(parts):
                merged[rank :: self.world] = part
            return merged
        for positions, part in zip(self._group_positions(groups), parts):
            for position, value in zip(positions.tolist(), part):
                merged[position] = value
        return merged


@contextlib.contextmanager
def ranks(device: str) -> Iterator[Ranks]:
    """Join the launcher's process group for the duration (a no-op in a single process).

    A group the caller already initialised is used as is and left open.
    """
    world = launched_world_size()
    if world == 1:
        yield Ranks()
        return
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
    try:
        yield Ranks(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)
    finally:
        if owns:
            dist.destroy_process_group()


def rank_device(device: str, ranks: Ranks) -> str:
    """One GPU per local rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if ranks.world > 1 and device == "cuda":
        return f"cuda:{ranks.local_rank}"
    return device
