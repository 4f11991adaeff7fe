"""How a training run gets its processes: one, N started here (`trainer.devices=N`), or the ones a launcher started.

`trainer.devices=N`: the Hydra process has composed the config and made the run directory; it starts N ranks with
the spawn method and hands each the resolved config, the run directory and Hydra's runtime config, so no rank
composes anything again (no extra output folders, no `${now:}` drift). It then waits: the first rank to fail ends the
others at once (they cannot finish without it) and the job fails with that rank's error. Stop signals sent to this
process are passed on to the ranks, which agree on a step, write one checkpoint and exit.

torchrun / srun: every process ran Hydra itself. They join the process group the launcher describes and adopt rank
0's run directory; the others remove the folder Hydra made for them if it differs and holds only Hydra's files.
"""
from __future__ import annotations

import multiprocessing.connection
import os
import shutil
import signal
import socket
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from advtrain.config import ConfigError
from advtrain.engine.distributed import World, destroy, external_world, init_process_group
from advtrain.engine.precision import resolve_accelerator
from advtrain.engine.signals import STOP_SIGNALS, Interrupted


class RankError(Exception):
    """A user error (bad data, NaN loss, ...) raised on one rank of a multi-process run, reported as one line."""


def run_training(cfg, run_dir: Path, hydra_cfg=None, device_index: int | None = None) -> dict[str, Any]:
    """device_index: the CUDA device of a one-process run (a parallel sweep job's claimed GPU)."""
    from advtrain.engine.run import train

    world = external_world()
    if world is not None:
        if cfg.trainer.devices != 1:
            raise ConfigError(f"trainer.devices={cfg.trainer.devices}, but a launcher already started "
                              f"{world.world_size} processes (torchrun or srun): leave trainer.devices=1, each "
                              "process trains on one device")
        return _join(cfg, run_dir, world)
    if cfg.trainer.devices > 1:
        return spawn(cfg, run_dir, cfg.trainer.devices, hydra_cfg)
    return train(cfg, run_dir, device_index=device_index or 0)


def backend_for(cfg) -> str:
    return "nccl" if resolve_accelerator(cfg.trainer) == "cuda" else "gloo"


def _join(cfg, run_dir: Path, world: World) -> dict[str, Any]:
    from advtrain.engine.run import train

    dist = init_process_group(world, backend_for(cfg))
    try:
        shared = Path(dist.broadcast(str(run_dir.resolve())))
        if shared != run_dir.resolve():
            discard_fresh_run_dir()
        return train(cfg, shared, dist)
    finally:
        destroy()


def discard_fresh_run_dir() -> None:
    """Remove this Hydra job's run folder if only Hydra's own files are in it (a run that failed before writing
    anything, or a rank that adopted rank 0's folder)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    hydra_files = {str(hydra_cfg.output_subdir), f"{hydra_cfg.job.name}.log"}
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= hydra_files:
        shutil.rmtree(run_dir)


def spawn(cfg, run_dir: Path, n: int, hydra_cfg=None) -> dict[str, Any]:
    """Run N ranks on this node and return rank 0's results."""
    if resolve_accelerator(cfg.trainer) == "cuda" and torch.cuda.device_count() < n:
        raise ConfigError(f"trainer.devices={n} but {torch.cuda.device_count()} CUDA device(s) are visible; use "
                          f"trainer.devices={torch.cuda.device_count()} or fewer")
    if cfg.trainer.batch_size < n:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} is the global batch and must give each of "
                          f"the {n} devices at least one example")
    mp = torch.multiprocessing.get_context("spawn")
    hydra_plain = None if hydra_cfg is None else _resolved(hydra_cfg)
    payload = (OmegaConf.to_yaml(cfg), hydra_plain, str(run_dir))
    world = World(rank=0, local_rank=0, world_size=n, master_port=_free_port())
    pipes = [mp.Pipe(duplex=False) for _ in range(n)]  # (parent's end, rank's end): one report per rank
    procs = [mp.Process(target=_rank_main, args=(rank, world, payload, pipes[rank][1]), name=f"advtrain-rank{rank}")
             for rank in range(n)]
    with _forward_signals(procs) as previous:
        for p in procs:
            p.start()
        for _, rank_end in pipes:
            rank_end.close()
        reports, failed = _wait(procs, [parent_end for parent_end, _ in pipes])
    return _outcome(reports, procs, failed, previous)


def _rank_main(rank: int, world: World, payload, report) -> None:
    from advtrain.engine.run import train
    from advtrain.errors import USER_ERRORS

    cfg_yaml, hydra_plain, run_dir = payload
    code = 0
    try:
        cfg = OmegaConf.create(cfg_yaml)
        if hydra_plain is not None:  # HydraConfig.get() works in the ranks as in the Hydra process (W&B group...)
            from hydra.core.hydra_config import HydraConfig

            HydraConfig.instance().cfg = OmegaConf.create({"hydra": hydra_plain})
        if resolve_accelerator(cfg.trainer) == "cpu":  # the node's cores are shared by the ranks
            torch.set_num_threads(max(1, torch.get_num_threads() // world.world_size))
        dist = init_process_group(World(rank, rank, world.world_size, world.master_addr, world.master_port),
                                  backend_for(cfg))
        results = train(cfg, Path(run_dir), dist)
        report.send(("ok", results if rank == 0 else None))
    except Interrupted as e:
        report.send(("interrupted", (e.signum, e.checkpoint)))
    except USER_ERRORS as e:
        report.send(("error", str(e)))
        code = 2
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal's group; the parent handles it
        code = 130
    except BaseException:  # noqa: BLE001 - a bug: the parent shows this rank's traceback
        report.send(("crash", traceback.format_exc()))
        code = 1
    finally:
        destroy()
    if code:
        os._exit(code)  # skip interpreter teardown: peers may be blocked in a collective with us


def _wait(procs, reports_in) -> tuple[dict, int | None]:
    """Collect each rank's report until all have exited; on the first failure kill the rest.

    Returns (rank -> (kind, value), the rank that failed first or None)."""
    reports: dict = {}
    waiting = {p.sentinel: ("exit", rank) for rank, p in enumerate(procs)}
    waiting.update({conn: ("report", rank) for rank, conn in enumerate(reports_in)})
    while any(kind == "exit" for kind, _ in waiting.values()):
        for ready in multiprocessing.connection.wait(list(waiting)):
            kind, rank = waiting.pop(ready)
            if kind == "report":
                try:
                    reports[rank] = ready.recv()
                except EOFError:  # the rank died without a word
                    pass
                continue
            procs[rank].join()
            if procs[rank].exitcode != 0:
                # Its report may still sit in the pipe: read it before the others go.
                conn = reports_in[rank]
                if rank not in reports and conn.poll(1):
                    try:
                        reports[rank] = conn.recv()
                    except EOFError:
                        pass
                for p in procs:
                    if p.is_alive():
                        p.kill()
                for p in procs:
                    p.join()
                return reports, rank
    return reports, None


def _outcome(reports: dict, procs, failed: int | None, previous: dict) -> dict[str, Any]:
    for rank, (kind, value) in sorted(reports.items()):
        if kind == "error":
            raise RankError(f"rank {rank}: {value}")
        if kind == "crash":
            raise RuntimeError(f"rank {rank} of {len(procs)} failed:\n{value}")
    if failed is not None:
        code = procs[failed].exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        raise RuntimeError(f"rank {failed} of {len(procs)} {how} without reporting an error")
    interrupted = [value for kind, value in reports.values() if kind == "interrupted"]
    if interrupted:
        signum, checkpoint = interrupted[0]
        raise Interrupted(signum, checkpoint, previous.get(signum))
    return reports[0][1]


class _forward_signals:
    """Pass stop signals on to the ranks; remember our previous handlers to chain them afterwards."""

    def __init__(self, procs):
        self.procs = procs
        self.previous: dict = {}

    def _forward(self, signum, frame) -> None:
        for p in self.procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    def __enter__(self) -> dict:
        for s in STOP_SIGNALS:
            self.previous[s] = signal.signal(s, self._forward)
        return self.previous

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        for p in self.procs:  # on any exception here (none expected) leave no orphan rank behind
            if p.is_alive():
                p.kill()


def _resolved(node):
    """A plain copy of a config node with every value that resolves; the rest (e.g. a single run's sweep subdir,
    which refers to the missing job number) is left out."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.errors import OmegaConfBaseException

    out: dict | list = {} if isinstance(node, DictConfig) else []
    for key in (node.keys() if isinstance(node, DictConfig) else range(len(node))):
        try:
            value = node[key]
        except OmegaConfBaseException:
            continue
        value = _resolved(value) if isinstance(value, (DictConfig, ListConfig)) else value
        if isinstance(out, dict):
            out[key] = value
        else:
            out.append(value)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
