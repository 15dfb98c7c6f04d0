"""torch.distributed plumbing for scene-sharded data-parallel training (``docs/distributed.md``).

Everything that talks to other ranks is here: who this process is (:class:`World`, from the
launcher's environment or an already initialised process group), the process group (gloo on
CPU, NCCL on CUDA, with a timeout), the once-per-step gradient all-reduce, the step-skip
agreement and the object gathers that assemble one checkpoint on rank 0.

Two launchers are supported, both standard:

- ``torchrun`` (one or many nodes, SLURM): it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` initialises the process group from them.
- ``ns-train --machine.num-devices N`` (one node, CUDA): nerfstudio's ``launch`` spawns the
  processes and initialises the group itself (with its 30-minute timeout); :func:`setup` then
  makes our own groups over the same ranks, so our collectives use our timeout.

Why an explicit all-reduce and not DDP: a step back-propagates once per target view and then
once more through the shared encode (``SharedState.backward_shared``), and never calls the
model's ``forward``; DDP only synchronises gradients of a backward that follows a forward through
its wrapper, and with ``no_sync`` on all but the last backward it would still need that forward.
One all-reduce of the flattened gradients after the target loop is what DDP would do anyway, in
one place, and lets a parameter that no rank used this step keep ``grad = None`` exactly as in
a single process (Adam then leaves it alone).

A rank that dies or stops answering ends the job: every collective here waits at most
``timeout`` and then raises :class:`RankFailureError` naming the operation, the step and the
setting to change (torchrun also stops the other workers as soon as one exits with an error).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch
import torch.distributed as dist

from evolsplat_ns.utils.errors import UserError

T = TypeVar("T")
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankFailureError(UserError):
    """A collective did not complete: another rank died, hung, or timed out."""


@dataclass(frozen=True)
class World:
    """This process's place in the job: global ``rank`` of ``size``, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that evaluates, logs, serves the viewer and writes checkpoints."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def world_from_env(env: Optional[dict[str, str]] = None) -> World:
    """The world torchrun (or SLURM through torchrun) describes in ``RANK``/``WORLD_SIZE``/
    ``LOCAL_RANK``; one process when ``WORLD_SIZE`` is unset."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return World()
    try:
        size, rank = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise UserError(f"bad torch.distributed environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from None
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"bad torch.distributed environment: RANK={rank} WORLD_SIZE={size}")
    return World(rank, size, local)


class Distributed:
    """The job's process groups and the collectives training uses (all no-ops in one process).

    Args:
        world: this process's place.
        timeout: how long any collective waits for the other ranks.
        compute_group: group for tensors on the training device (None = the default group).
        object_group: gloo group for pickled objects (checkpoint gathers stay off the GPU).
    """

    def __init__(self, world: World = World(), timeout: timedelta = timedelta(seconds=600),
                 compute_group: Any = None, object_group: Any = None) -> None:
        self.world = world
        self.timeout = timeout
        self.compute_group = compute_group
        self.object_group = object_group

    # -- guarded collectives ------------------------------------------------------------------

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (RuntimeError, dist.DistError) as e:  # gloo/NCCL errors, timeouts, closed connections
            raise RankFailureError(
                f"rank {self.world.rank} of {self.world.size}: {what} did not complete within "
                f"{self.timeout.total_seconds():g} s: another rank died, hung or was killed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). The job stops; resume from the last checkpoint "
                "with --load-dir (any number of ranks); a phase only rank 0 runs (evaluation of all images, "
                "a checkpoint write) that takes longer needs a larger --distributed-timeout") from e

    def all_reduce_sum(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (returns it)."""
        if self.world.parallel:
            self._run(what, lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.compute_group))
        return tensor

    def any_rank(self, flag: torch.Tensor, what: str) -> bool:
        """Whether ``flag`` (a 0-d tensor, nonzero = true, on the training device) is true on any rank;
        the one host read of the step."""
        flag = flag.detach().float().reshape(1)
        return bool(self.all_reduce_sum(flag, what).item() > 0)

    def average_gradients(self, params: Iterable[torch.nn.Parameter], buffers: Iterable[torch.Tensor],
                          what: str) -> None:
        """Average the gradients of ``params`` and the floating values of ``buffers`` over ranks,
        in ONE all-reduce (one flat tensor).

        A parameter gets ``grad`` = (sum of the ranks' grads) / world size if any rank has one
        (missing ones count as zero), else stays ``None``: so the step equals one process whose
        loss is the mean of the ranks' sample losses (docs/distributed.md). Buffers (BatchNorm
        running statistics) become the mean of the ranks' values.
        """
        if not self.world.parallel:
            return
        params = list(params)
        buffers = [b for b in buffers if b.is_floating_point()]
        device = params[0].device if params else (buffers[0].device if buffers else torch.device("cpu"))
        parts = [p.grad.detach().reshape(-1).float() if p.grad is not None
                 else torch.zeros(p.numel(), device=device) for p in params]
        present = torch.tensor([float(p.grad is not None) for p in params], device=device)
        flat = torch.cat([*parts, present, *[b.detach().reshape(-1).float() for b in buffers]])
        self.all_reduce_sum(flat, what).div_(self.world.size)
        grads, offset = [], 0
        for p in params:
            grads.append(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        present = flat[offset:offset + len(params)].tolist()
        for p, grad, has in zip(params, grads, present):
            p.grad = grad.to(p.dtype) if has > 0 else None
        offset += len(params)
        for b in buffers:
            n = b.numel()
            b.copy_(flat[offset:offset + n].view_as(b))
            offset += n

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers (DDP does this when it wraps a model)."""
        if not self.world.parallel:
            return
        for t in [*module.parameters(), *module.buffers()]:
            self._run("broadcasting rank 0's weights",
                      lambda t=t: dist.broadcast(t.data, src=0, group=self.compute_group))

    def broadcast_object(self, obj: T, what: str) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.world.parallel:
            return obj
        box = [obj]
        self._run(what, lambda: dist.broadcast_object_list(box, src=0, group=self.object_group))
        return box[0]

    def gather_objects(self, obj: T, what: str) -> Optional[list[T]]:
        """Every rank's ``obj`` in rank order on rank 0 (None on the other ranks)."""
        if not self.world.parallel:
            return [obj]
        out: Optional[list] = [None] * self.world.size if self.world.is_main else None
        self._run(what, lambda: dist.gather_object(obj, out, dst=0, group=self.object_group))
        return out

    def barrier(self, what: str) -> None:
        if self.world.parallel:
            self._run(what, lambda: dist.barrier(group=self.object_group))


_CURRENT = Distributed()


def current() -> Distributed:
    """The job's :class:`Distributed` (one process until :func:`setup` ran)."""
    return _CURRENT


def setup(device_type: str, timeout_s: float, local_rank: int = 0) -> Distributed:
    """Join the job's process group (idempotent) and return it as :class:`Distributed`.

    - The group already exists (``ns-train --machine.num-devices N``): its ranks, with our own
      groups carrying ``timeout_s``.
    - ``WORLD_SIZE`` > 1 in the environment (torchrun): init from ``MASTER_ADDR``/``MASTER_PORT``,
      backend NCCL on CUDA, gloo on CPU; the group is destroyed at exit.
    - Otherwise one process: nothing is initialised.
    """
    global _CURRENT
    if _CURRENT.world.parallel:
        return _CURRENT
    timeout = timedelta(seconds=float(timeout_s))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if dist.is_available() and dist.is_initialized():
        world = World(dist.get_rank(), dist.get_world_size(), local_rank)
        if world.parallel:
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            compute = dist.new_group(backend=dist.get_backend(), timeout=timeout)
            objects = dist.new_group(backend="gloo", timeout=timeout)
            _CURRENT = Distributed(world, timeout, compute, objects)
        return _CURRENT
    world = world_from_env()
    if not world.parallel:
        return _CURRENT
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE={world.size} but {', '.join(missing)} not set: launch with torchrun "
                        "(it sets them) or export them (docs/distributed.md)")
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    try:
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size, timeout=timeout)
    except (RuntimeError, dist.DistError) as e:
        raise RankFailureError(f"rank {world.rank} of {world.size} could not join the process group at "
                               f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:g} s "
                               f"({type(e).__name__}: {e})") from e
    objects = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    _CURRENT = Distributed(world, timeout, None, objects)
    atexit.register(_destroy)
    return _CURRENT


def _destroy() -> None:
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = Distributed()
