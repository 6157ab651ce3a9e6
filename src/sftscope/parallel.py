"""Data parallelism for the streamed commands (analyze, probe, swap) under ``torchrun`` or
``accelerate launch``.

Each process (rank) takes a contiguous share of the samples, cut at whole batches of the
one-process chunking (``shard_range``), so every sample is computed in the very batch it would
be in alone; it runs the usual streamed reduction over its share, and rank 0 gathers the
per-sample results, puts them back in sample order and writes the tables; the other ranks
return. The tables are those of one process, to within float rounding (on CPU, bit for bit).

The launchers set ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``join`` starts ``torch.distributed`` from them (nccl when the ranks run on GPUs, each on its
``LOCAL_RANK`` device; gloo on CPU). Results are gathered as CPU objects over a gloo group
either way. Without a launcher (``WORLD_SIZE`` unset or 1) nothing changes: one process, no
process group. On CPU, ``accelerate launch --multi_gpu`` (its torchrun path) starts the
processes; its ``--cpu``/MULTI_CPU launch starts one without mpirun (``lone_launch`` notes it).

Failures: every step that may fail on one rank only (validation, a model load, a capture)
ends in an exchange of status (``Group.together``): when one rank failed, every rank raises the
same error, so none is left waiting in a collective.

Torch is imported inside the functions: the rank helpers are used by torch-free code.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sftscope.errors import Interrupted, SftscopeError

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def world_size() -> int:
    """Processes launched together (``WORLD_SIZE``; 1 without a launcher)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank (``RANK``; 0 without a launcher)."""
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``): the GPU it uses."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True on the process that prints and writes (rank 0, or the only process)."""
    return rank() == 0


_MPI_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def lone_launch() -> bool:
    """``accelerate launch`` was asked for several processes but started one: its simple
    launcher (``--cpu``, a MULTI_CPU config, more processes than GPUs) runs the command once,
    exporting ``ACCELERATE_USE_CPU`` and, when more processes were asked, ``MASTER_ADDR``;
    only mpirun (``--mpirun_hostfile``) would start the others."""
    return ("ACCELERATE_USE_CPU" in os.environ and bool(os.environ.get("MASTER_ADDR"))
            and world_size() <= 1 and max(_env_int(n, 1) for n in _MPI_SIZES) <= 1)


@functools.cache
def note_lone_launch() -> None:
    """One line (once a process) when ``lone_launch``: the run goes on as one process."""
    if lone_launch():
        from sftscope.progress import say

        say("note: accelerate launch started 1 process (without mpirun its --cpu / MULTI_CPU "
            "launcher starts one); for N processes on CPU use accelerate launch --multi_gpu "
            "--num_processes N (torchrun, gloo) or torchrun --nproc_per_node N; going on as one "
            "process")


def cpu_launch() -> bool:
    """Several processes launched on a machine without CUDA: the Trainer must be told
    (``use_cpu``), or it runs DDP-less and every process trains alone on the whole batch."""
    import torch

    note_lone_launch()
    return world_size() > 1 and not torch.cuda.is_available()


def launch_id() -> str:
    """Names this launch (the same on every rank of it): the launcher's run id and rendezvous
    address; empty without a launcher."""
    if world_size() <= 1:
        return ""
    parts = (os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("MASTER_ADDR", ""),
             os.environ.get("MASTER_PORT", ""))
    return ":".join(parts)


def shard_range(n: int, world: int, rank: int, unit: int = 1) -> range:
    """The samples of ``rank`` among ``world`` processes: a contiguous range of ``0..n-1`` cut
    at multiples of ``unit`` (the batch size, so each rank runs exactly the batches one process
    would). Units are split as evenly as possible, the first ranks taking the extra ones (so
    rank 0 always has a share when ``n > 0``); a rank gets none when there are fewer units
    than ranks."""
    if world < 1 or not 0 <= rank < world:
        raise SftscopeError(f"rank {rank} is not among {world} processes")
    unit = max(1, int(unit))
    units = -(-n // unit)
    lo, hi = -(-rank * units // world), -(-(rank + 1) * units // world)
    return range(min(lo * unit, n), min(hi * unit, n))


def shard_counts(n: int, world: int, unit: int = 1) -> list[int]:
    """How many samples each rank takes (``shard_range`` of every rank)."""
    return [len(shard_range(n, world, r, unit)) for r in range(world)]


def _describe(error: BaseException) -> tuple[str, str]:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", str(error)
    if isinstance(error, SftscopeError):
        return "user", str(error)
    return "bug", f"{type(error).__name__}: {error}"


_STATE: dict[str, Any] = {"cpu_group": None, "ours": False, "peers": []}


def failed_peers(wait_s: float = 2.0) -> list[int]:
    """Ranks of this launch whose process is gone (killed, crashed; zombies included), from
    the (host, pid) each rank announced at ``join``; waits up to ``wait_s`` for a dying one
    (its connections close just before it exits). Ranks on other hosts cannot be asked."""
    import socket
    import time

    from sftscope.process import process_alive

    peers = _STATE["peers"]
    host = socket.gethostname()
    t0 = time.monotonic()
    while True:
        gone = [r for r, (h, pid) in enumerate(peers) if h == host and pid != os.getpid()
                and not process_alive({"pid": pid, "host": h})]
        if gone or time.monotonic() - t0 >= wait_s or not peers:
            return gone
        time.sleep(0.05)


def lost_peer(world: int, wait_s: float = 2.0) -> SftscopeError | None:
    """One line for rank 0 when another process of the launch died, or None."""
    gone = failed_peers(wait_s)
    if not gone:
        return None
    return SftscopeError(f"process {gone[0]} of {world} failed (killed, or out of memory: see "
                         f"its own output); the others stopped: run the same command again to "
                         f"resume")


@contextlib.contextmanager
def _collective(world: int) -> Iterator[None]:
    """A collective that fails because a process of the launch died is that one line, not the
    communication library's traceback."""
    try:
        yield
    except SftscopeError:
        raise
    except (RuntimeError, ConnectionError) as e:
        lost = lost_peer(world)
        if lost is None:
            raise
        raise lost from e


def _announce(world: int, group: Any = None) -> None:
    """Every rank's (host, pid), gathered once over the started process group, so that a
    process that dies later can be named (``failed_peers``)."""
    if _STATE["peers"]:
        return
    import socket

    import torch.distributed as dist

    peers: list[Any] = [None] * world
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()), group=group)
    _STATE["peers"] = [tuple(p) for p in peers]


@contextlib.contextmanager
def watched(world: int) -> Iterator[None]:
    """Around collectives sftscope does not run itself (the Trainer's DDP/FSDP in ``tune``):
    a rank that dies in them is one line on rank 0, ``process R of W failed ...``, not the
    communication library's traceback (nor "interrupted", when the launcher stops the
    survivors first). Needs the process group started (``TrainingArguments`` starts it);
    alone, nothing to do.

    A dead peer is noticed at once on gloo and nccl alike (its connections close); a peer
    that hangs without dying is the process group's timeout to catch (the Trainer's
    ``ddp_timeout``, 30 minutes by default)."""
    if world <= 1:
        yield
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with _collective(world):
            _announce(world)
    with _collective(world):
        yield


def _destroy() -> None:
    import torch.distributed as dist

    if _STATE["ours"] and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _STATE.update(cpu_group=None, ours=False, peers=[])


@dataclass
class Group:
    """This process's place among the launched processes (``world == 1``: alone; every
    collective is then a no-op)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None
    device: str | None = None  # this rank's device (set by ``join`` when launched)
    _cpu: Any = field(default=None, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, n: int, unit: int = 1) -> list[int]:
        """The sample indices this rank processes (all of them when alone)."""
        return list(shard_range(n, self.world, self.rank, unit))

    def counts(self, n: int, unit: int = 1) -> list[int]:
        """Samples per rank."""
        return shard_counts(n, self.world, unit)

    def record(self, n: int, unit: int = 1) -> dict[str, Any]:
        """What run.json keeps about the processes: ``world_size``, ``samples_per_rank`` and
        ``processes`` (backend, how the shares were cut)."""
        return {"world_size": self.world, "samples_per_rank": self.counts(n, unit),
                "processes": {"backend": self.backend, "shard_unit": unit,
                              "shares": "contiguous sample ranges cut at multiples of "
                                        "shard_unit (whole batches)"}}

    # -- collectives -----------------------------------------------------------------------

    def settle(self, error: BaseException | None, what: str) -> None:
        """Exchange every rank's outcome of ``what``; raise when any rank failed: the failing
        rank its own error, the others the same message (a user error) or one naming the
        failing rank (a bug), or ``Interrupted``."""
        if not self.active:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        states: list[Any] = [None] * self.world
        with _collective(self.world):
            dist.all_gather_object(states, None if error is None else _describe(error),
                                   group=self._cpu)
        if error is not None:
            raise error
        for r, state in enumerate(states):
            if state is None:
                continue
            kind, message = state
            if kind == "interrupted":
                raise Interrupted()
            if kind == "user":
                raise SftscopeError(message)
            raise SftscopeError(f"process {r} of {self.world} failed during {what}: {message}")

    @contextlib.contextmanager
    def together(self, what: str) -> Iterator[None]:
        """Run a block on every rank, then settle: all ranks pass, or all raise."""
        error: BaseException | None = None
        try:
            yield
        except BaseException as e:  # noqa: BLE001 - every rank must learn of it
            error = e
        self.settle(error, what)

    def run(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` on every rank, settled (see ``together``)."""
        out: Any = None
        with self.together(what):
            out = fn()
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (CPU objects, pickled) on rank 0, in rank order; None
        elsewhere. Alone: ``[obj]``."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.main else None
        with _collective(self.world):
            dist.gather_object(obj, out, dst=0, group=self._cpu)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        with _collective(self.world):
            dist.broadcast_object_list(box, src=0, group=self._cpu)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            with _collective(self.world):
                dist.barrier(group=self._cpu)


def check_launch(device: str, device_map: str | None, world: int) -> None:
    """Settings several processes cannot share (torch-free: also a config check)."""
    if world <= 1:
        return
    if device_map:
        raise SftscopeError(f"--device-map {device_map} shards one model over several devices, "
                            f"but {world} processes were launched (each holds a whole model on "
                            f"its own device): drop --device-map, or launch one process")
    kind, _, index = device.partition(":")
    if kind == "cuda" and index:
        raise SftscopeError(f"--device {device} would put all {world} processes on one GPU; "
                            f"give --device cuda (or auto): each process takes its LOCAL_RANK "
                            f"GPU")


def rank_device(device: str, local: int) -> str:
    """The device of the process with local rank ``local``: its own GPU (``cuda:LOCAL_RANK``)
    when ``device`` is ``auto``/``cuda`` and GPUs are visible, else ``device`` resolved."""
    import torch

    from sftscope.load.runtime import resolve_device

    dev = resolve_device(device)
    if dev == "cuda":
        n = torch.cuda.device_count()
        if local >= n:
            raise SftscopeError(f"process with LOCAL_RANK {local} has no GPU of its own (only "
                                f"{n} visible); launch at most {n} processes per node")
        return f"cuda:{local}"
    return dev


def join(device: str = "auto", device_map: str | None = None) -> Group:
    """This process's ``Group``: alone without a launcher; otherwise start (or reuse) the
    process group from the launcher's environment. Every rank checks its device (and all
    fail together when one cannot run)."""
    world = world_size()
    if world <= 1:
        note_lone_launch()
        return Group()
    import torch
    import torch.distributed as dist

    check_launch(device, device_map, world)  # the same on every rank: no exchange needed
    local = local_rank()
    if not dist.is_initialized():
        gpu = device != "cpu" and torch.cuda.is_available()
        backend = "nccl" if gpu else "gloo"
        if gpu and local < torch.cuda.device_count():
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        _STATE["ours"] = True
        atexit.register(_destroy)
    backend = str(dist.get_backend())
    if _STATE["cpu_group"] is None:
        _STATE["cpu_group"] = dist.new_group(backend="gloo") if backend != "gloo" else None
    if dist.get_world_size() != world:
        raise SftscopeError(f"WORLD_SIZE is {world} but the process group has "
                            f"{dist.get_world_size()} processes; launch with torchrun or "
                            f"accelerate launch")
    _announce(world, _STATE["cpu_group"])  # who is who, to name a process that dies later
    group = Group(world=world, rank=dist.get_rank(), local_rank=local, backend=backend,
                  _cpu=_STATE["cpu_group"])
    group.device = group.run(lambda: rank_device(device, local), "device set-up")
    if group.device.startswith("cuda:"):
        torch.cuda.set_device(int(group.device.split(":")[1]))
    return group


def empty_like_table(columns: list[str]):
    """What a non-main rank returns instead of a table (the columns, no rows)."""
    import pandas as pd

    return pd.DataFrame(columns=columns)
