"""How a training run gets its processes: one, N started here (`trainer.devices=N`), or the ones a launcher started.

`trainer.devices=N`: the Hydra process has composed the config and made the run directory; it starts N ranks with
the spawn method and hands each the resolved config, the run directory and Hydra's runtime config, so no rank
composes anything again (no extra output folders, no `${now:}` drift). It then waits: the first rank to fail ends the
others at once (they cannot finish without it) and the job fails with that rank's error. Stop signals sent to this
process are passed on to the ranks, which agree on a step, write one checkpoint and exit. The ranks die with this
process: killed (kill -9), it cannot supervise them any more.

torchrun / srun: every process ran Hydra itself. They join the process group the launcher describes and adopt rank
0's run directory; the others remove the folder Hydra made for them if it differs and holds only Hydra's files.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from advtrain.errors import ConfigError, RankDied, RankError, UserError
from advtrain.engine.distributed import World, destroy, external_world, init_process_group, lost_peer
from advtrain.engine.precision import resolve_accelerator
from advtrain.engine.rundir import discard_fresh_run_dir
from advtrain.engine.signals import STOP_SIGNALS, Interrupted


# When the first ranks to fail only lost a peer under a collective, wait this long for the peer's own end to show,
# so the job reports the cause (a killed rank), not its echo, however a loaded node schedules the exits.
ROOT_CAUSE_WAIT_S = 5.0


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


def spawn(cfg, run_dir: Path, n: int, hydra_cfg=None) -> dict[str, Any]:
    """Run N ranks on this node and return rank 0's results."""
    _check_devices(cfg, n)
    if cfg.trainer.batch_size < n:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} is the global batch and must give each of "
                          f"the {n} devices at least one example")
    mp = torch.multiprocessing.get_context("spawn")
    hydra_plain = None if hydra_cfg is None else _resolved(hydra_cfg)
    payload = (OmegaConf.to_yaml(cfg), hydra_plain, str(run_dir))
    world = World(rank=0, local_rank=0, world_size=n, master_port=_free_port())
    pipes = [mp.Pipe(duplex=False) for _ in range(n)]  # (parent's end, rank's end): one report per rank
    # Linux's parent-death signal follows the thread that forks, not the process: only safe from the main thread.
    pdeathsig = threading.current_thread() is threading.main_thread()
    procs = [mp.Process(target=_rank_main, args=(rank, world, payload, pipes[rank][1], pdeathsig),
                        name=f"advtrain-rank{rank}") for rank in range(n)]
    with _forward_signals(procs) as previous:
        for p in procs:
            p.start()
        for _, rank_end in pipes:
            rank_end.close()
        reports, ended = _wait(procs, [parent_end for parent_end, _ in pipes])
    return _outcome(reports, ended, n, previous)


def _check_devices(cfg, n: int) -> None:
    if resolve_accelerator(cfg.trainer) == "cuda":
        if torch.cuda.device_count() < n:
            raise ConfigError(f"trainer.devices={n} but {torch.cuda.device_count()} CUDA device(s) are visible; use "
                              f"trainer.devices={torch.cuda.device_count()} or fewer")
        return
    cores = _cpu_cores()
    if n > cores:  # more ranks than cores only time-share them, slower than fewer ranks
        raise ConfigError(f"trainer.devices={n} but {cores} CPU core(s) are available to this process; with "
                          f"trainer.accelerator=cpu use trainer.devices=1 to {cores}")


def _cpu_cores() -> int:
    """The cores this process may run on (a cgroup or taskset may allow fewer than the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _rank_main(rank: int, world: World, payload, report, pdeathsig: bool) -> None:
    from advtrain.engine.run import train

    _die_with_parent(pdeathsig)
    # Ctrl-C at a terminal reaches its whole foreground process group. In a group of its own a rank hears Ctrl-C
    # once, as the parent forwards it; hearing it twice (terminal and parent) would mean "stop at once, without a
    # checkpoint".
    os.setpgrp()
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
    except UserError as e:
        report.send(("error", str(e)))
        code = 2
    except KeyboardInterrupt:  # a second Ctrl-C, forwarded: the parent reports it and ends every rank
        code = 130
    except BaseException as e:  # noqa: BLE001 - a bug: the parent shows this rank's traceback
        # ... unless a peer vanished under a collective: then the peer's end is the cause to report.
        report.send(("lost-peer" if lost_peer(e) else "crash", traceback.format_exc()))
        code = 1
    finally:
        destroy()
    if code:
        os._exit(code)  # skip interpreter teardown: peers may be blocked in a collective with us


def _die_with_parent(pdeathsig: bool) -> None:
    """End this rank as soon as the process that started it dies: no one else would stop it, and it would train to
    the end unsupervised, holding its device."""
    parent = multiprocessing.parent_process()
    if pdeathsig and _set_parent_death_signal():
        if os.getppid() != parent.pid:  # the parent died before prctl: no signal will come
            os.kill(os.getpid(), signal.SIGKILL)
        return
    # Elsewhere (or spawned from another thread): the parent's end of a pipe closes when it dies.
    threading.Thread(target=_kill_self_when_ready, args=(parent.sentinel,), name="advtrain-parent-watch",
                     daemon=True).start()


def _set_parent_death_signal() -> bool:
    """Linux: have the kernel send us SIGKILL when the parent dies, even while we are stuck in native code."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        return libc.prctl(ctypes.c_int(pr_set_pdeathsig), ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0),
                          ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):
        return False


def _kill_self_when_ready(sentinel) -> None:
    multiprocessing.connection.wait([sentinel])
    os.kill(os.getpid(), signal.SIGKILL)


def _wait(procs, reports_in) -> tuple[dict, dict]:
    """Collect each rank's report until all have exited; on the first failure end the rest.

    Returns (rank -> (kind, value), rank -> exit code of each rank that ended by itself, not killed by us)."""
    reports: dict = {}
    ended: dict = {}
    waiting = {p.sentinel: ("exit", rank) for rank, p in enumerate(procs)}
    waiting.update({conn: ("report", rank) for rank, conn in enumerate(reports_in)})
    while len(ended) < len(procs) and not _failed(ended):
        _collect(waiting, procs, reports_in, reports, ended)
    if _failed(ended):
        _wait_for_root_cause(waiting, procs, reports_in, reports, ended)
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join()
    return reports, ended


def _collect(waiting: dict, procs, reports_in, reports: dict, ended: dict, timeout: float | None = None) -> None:
    """Take in whatever is ready: reports, and the exits of ranks (with their last report)."""
    for ready in multiprocessing.connection.wait(list(waiting), timeout):
        if ready not in waiting:  # a report already read with its rank's exit, earlier in this batch
            continue
        kind, rank = waiting.pop(ready)
        if kind == "report":
            _receive(ready, rank, reports)
            continue
        procs[rank].join()
        ended[rank] = procs[rank].exitcode
        conn = reports_in[rank]
        if conn in waiting and conn.poll(1):  # its report may still sit in the pipe: read it before the others go
            del waiting[conn]
            _receive(conn, rank, reports)


def _receive(conn, rank: int, reports: dict) -> None:
    try:
        reports[rank] = conn.recv()
    except EOFError:  # the rank died without a word
        pass


def _failed(ended: dict) -> bool:
    return any(code != 0 for code in ended.values())


def _wait_for_root_cause(waiting: dict, procs, reports_in, reports: dict, ended: dict) -> None:
    """While the only failures seen are ranks that lost a peer, give the peer's own exit a few seconds to show."""
    deadline = time.monotonic() + ROOT_CAUSE_WAIT_S
    while (len(ended) < len(procs) and _only_lost_peers(reports, ended)
           and (left := deadline - time.monotonic()) > 0):
        _collect(waiting, procs, reports_in, reports, ended, timeout=left)


def _only_lost_peers(reports: dict, ended: dict) -> bool:
    return all(reports.get(rank, ("",))[0] == "lost-peer" for rank, code in ended.items() if code != 0)


def _outcome(reports: dict, ended: dict, n: int, previous: dict) -> dict[str, Any]:
    # A rank killed by a signal is the cause; the others' errors (a collective that lost it) are consequences.
    killed = sorted((rank for rank, code in ended.items() if code < 0),
                    key=lambda rank: (ended[rank] != -signal.SIGKILL, rank))
    if killed:
        rank, signum = killed[0], -ended[killed[0]]
        why = " (the kernel's OOM killer sends it when memory runs out)" if signum == signal.SIGKILL else ""
        raise RankDied(f"rank {rank} of {n} was killed by {_signal_name(signum)}{why}; the other ranks were stopped")
    for rank, (kind, value) in sorted(reports.items()):
        if kind == "error":
            raise RankError(f"rank {rank}: {value}")
    # A bug on one rank first, then ranks that merely lost a peer.
    for rank, (kind, value) in sorted(reports.items(), key=lambda item: (item[1][0] != "crash", item[0])):
        if kind in ("crash", "lost-peer"):
            raise RuntimeError(f"rank {rank} of {n} failed:\n{value}")
    for rank, code in sorted(ended.items()):
        if code != 0:
            raise RankDied(f"rank {rank} of {n} exited with status {code} without reporting an error")
    interrupted = [value for kind, value in reports.values() if kind == "interrupted"]
    if interrupted:
        signum, checkpoint = interrupted[0]
        raise Interrupted(signum, checkpoint, previous.get(signum))
    return reports[0][1]


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # a real-time signal has no name
        return f"signal {signum}"


class _forward_signals:
    """Pass stop signals on to the ranks; remember our previous handlers to chain them afterwards. A second Ctrl-C
    stops at once: the ranks are killed on the way out (__exit__) and the CLI reports it."""

    def __init__(self, procs):
        self.procs = procs
        self.previous: dict = {}
        self.interrupts = 0

    def _forward(self, signum, frame) -> None:
        for p in self.procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt

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
