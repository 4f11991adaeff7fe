"""The process group a run trains in: who we are (rank, local rank, world size) and the few collectives the engine
needs outside DDP's own gradient all-reduce.

A run of one process uses `SINGLE`, whose collectives return their inputs, so the engine has one code path. With
several processes the engine's own agreements (signals, NaN checks, epoch metrics, evaluation counts, checkpoint
state) go through a gloo group on the host: they never wait on the GPU's queue, so the hot loop stays asynchronous
even when it agrees on a stop flag every step.

How a world comes about:
- `advtrain trainer.devices=N`: one Hydra process starts N ranks on this node (advtrain.engine.spawn);
- torchrun: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
- SLURM (srun / submitit with several tasks): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, the master is the first
  host of SLURM_JOB_NODELIST, the port MASTER_PORT or one derived from the job id.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# A rank that waits longer than this for the others gives up instead of hanging forever (e.g. a peer was killed).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


class Dist:
    """This process's place in the run; the collectives are identities when world_size == 1."""

    def __init__(self, world: World | None = None, host_group: Any = None):
        self.rank = world.rank if world else 0
        self.local_rank = world.local_rank if world else 0
        self.world_size = world.world_size if world else 1
        self._group = host_group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64 on the host)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self._group)
        return t.tolist()

    def max(self, values: list[int]) -> list[int]:
        """Element-wise max over ranks: "did any rank see this?" for flags and signal numbers."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return [int(v) for v in t.tolist()]

    def mean(self, value: float) -> float:
        """The mean over ranks, identical on every rank: decisions taken from it agree everywhere."""
        return self.sum([value])[0] / self.world_size

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (picklable, CPU tensors)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self._group)


SINGLE = Dist()


def external_world() -> World | None:
    """The world a launcher started us in (torchrun or SLURM with several tasks), or None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env and int(env["WORLD_SIZE"]) > 1:
        return World(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)),
                     world_size=int(env["WORLD_SIZE"]), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                     master_port=int(env.get("MASTER_PORT", 29500)))
    # SLURM_STEP_NUM_TASKS is set by srun (sbatch sets only SLURM_NTASKS): a batch script with --ntasks=4 that
    # runs advtrain directly is one process, not four, and must not wait for three peers that never come.
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or 1)
    if "SLURM_PROCID" in env and tasks > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return World(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)),
                     world_size=tasks, master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodes)[0],
                     master_port=port)
    return None


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names: "gpu[01-03,07],login1" -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts: list[str] = []
    for prefix, ranges, suffix in re.findall(r"([^,\[]+)(?:\[([^\]]+)\])?([^,\[]*)", nodelist):
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    return hosts


def init_process_group(world: World, backend: str) -> Dist:
    """Join the world (blocking until every rank has arrived) and open the host-side gloo group."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = world.master_addr, str(world.master_port)
    dist.init_process_group(backend, rank=world.rank, world_size=world.world_size, timeout=COLLECTIVE_TIMEOUT)
    host_group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) if backend != "gloo" else dist.group.WORLD
    return Dist(world, host_group)


# What gloo and NCCL say when the process at the other end of a collective is gone. gloo raises a plain RuntimeError,
# so its text is all there is to go by.
_LOST_PEER_TEXT = ("Connection reset by peer", "Connection closed by peer", "gloo/transport", "NCCL")


def lost_peer(e: BaseException) -> bool:
    """Did a collective fail because another rank vanished? Then that rank's end is the error to report, not this."""
    while e is not None:
        if isinstance(e, getattr(dist, "DistError", ())) or any(t in str(e) for t in _LOST_PEER_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the run's seed (a 1-process run is unchanged); other ranks get independent streams."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def sync_buffers(model: torch.nn.Module, dist: Dist) -> None:
    """Give every rank rank 0's buffers (BN running statistics, which each rank updates from its own shard), so that
    evaluation shards and checkpoints see one model."""
    if dist.enabled:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def to_cpu(obj):
    """A copy of nested containers with every tensor moved to the CPU (to be pickled between ranks)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
