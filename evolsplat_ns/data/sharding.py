"""Which training segments each rank of a data-parallel run trains on (scene-sharded data parallel).

The rule (:func:`assign_segments`): every segment key gets a seeded, process-independent rank
``crc32(f"{seed}:{key}")`` (ties broken by the key); in that order the segments are dealt out
round-robin, the first to rank 0, the second to rank 1, ... So:

- every segment is assigned to exactly one rank;
- shards are balanced by count (sizes differ by at most one);
- the assignment is a pure function of the *set* of keys, the world size and the seed (the order
  in which keys are listed, the machine and the Python hash salt do not matter);
- another world size deals the same order out again: a new balanced assignment (resuming a run
  with more or fewer ranks reassigns segments; each rank then loads only its own segments' state).

Why seeded dealing and not contiguous chunks: datasets are listed in an order that means
something (Waymo segments sorted by location or time); contiguous chunks would give one rank all
the night drives. Dealing a seeded order gives every rank a mix of scenes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

from evolsplat_ns.utils.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel run: rank ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} of world size {self.world_size} is not a valid shard")


def _order_key(seed: int, key: str) -> tuple[int, str]:
    return zlib.crc32(f"{seed}:{key}".encode()), key


def assign_segments(keys: Sequence[str], world_size: int, seed: int = 0) -> list[list[int]]:
    """Indices into ``keys`` of the segments of each rank (module docstring), each list ascending.

    Raises ConfigError when there are fewer segments than ranks (a rank would have nothing to
    train) and ValueError on repeated keys.
    """
    keys = [str(k) for k in keys]
    if len(set(keys)) != len(keys):
        raise ValueError("segment keys must be unique to be assigned to ranks")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if world_size == 1:  # no data parallelism: everything, in dataset order (even nothing: the scheduler says why)
        return [list(range(len(keys)))]
    if len(keys) < world_size:
        raise ConfigError(f"{len(keys)} training segment(s) cannot be shared by {world_size} ranks (every rank "
                          "trains on at least one segment): use fewer processes (--nproc_per_node / --nnodes) "
                          "or more training data")
    order = sorted(range(len(keys)), key=lambda i: _order_key(seed, keys[i]))
    return [sorted(order[r::world_size]) for r in range(world_size)]


def owner_of(keys: Sequence[str], world_size: int, seed: int = 0) -> dict[str, int]:
    """``key -> rank`` of :func:`assign_segments`."""
    keys = [str(k) for k in keys]
    return {keys[i]: r for r, shard in enumerate(assign_segments(keys, world_size, seed)) for i in shard}


def shard_seed(seed: int, shard: Shard) -> int | list[int]:
    """Seed of a rank's own random streams (segment order, source/target selection): ``seed`` itself
    in a one-process run (so single-process runs are as before), else ``[seed, rank, world_size]``
    (numpy seeds a generator from a list), so ranks draw independent streams."""
    return seed if shard.world_size == 1 else [seed, shard.rank, shard.world_size]
