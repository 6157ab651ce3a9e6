"""One training phase of the demo pair (base pre-training or SFT), in this process or data
parallel over worker processes.

Both paths run ``transformers.Trainer`` with the same arguments. With ``ranks > 1`` the parent
saves the model as a Hugging Face folder and the dataset as tensors in a work folder, and
starts ``ranks`` worker processes of ``threads`` torch threads each. They join a gloo group
through a file in that folder (no network port), and ``Trainer`` takes its DDP path: accelerate
hands rank ``r`` the batches ``r, r + ranks, ...`` of the one shuffled order, so each step
trains on the same ``batch_size`` examples as one process would (checked in
``tests/test_demo_training.py``). Only float rounding differs: gradients are summed across ranks,
and ``average_tokens_across_devices`` keeps the loss a mean over the step's labelled tokens.
Rank 0 writes the trained model and the loss history; the parent loads them.

Why processes: a tiny model's training step is thousands of small operations, and two torch
threads in one process mostly wait on each other (``FULL``'s base step in the demo, idle 2-core
box: one thread 125 ms; two ranks of one thread 87-93 ms, 102 ms while DDP still broadcast the
buffers; two sleeping OpenMP threads were slower than one). Each rank still runs the whole
optimizer step for every parameter and the gradients are all-reduced every step (a bare loop:
69 ms a step without the all-reduce, 81 ms with it), which is why two ranks are not twice as
fast.

Failure handling: a worker's error ends the phase with one line naming it; an interrupt in the
parent stops the workers; a worker whose parent is gone (``kill -9``) stops at its next step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sftscope.errors import SftscopeError
from sftscope.io import read_json, write_json, write_text
from sftscope.load.runtime import torch_threads
from sftscope.progress import enabled as progress_enabled
from sftscope.progress import say

THREADS: dict[str, int] = {}  # torch threads of each training phase, for the manifest


@dataclass(frozen=True)
class Phase:
    """What one training phase needs besides the model and the data (plain, picklable data)."""

    name: str
    steps: int
    lr: float
    batch_size: int  # examples a step, all ranks together
    seed: int
    warmup_frac: float
    optim: str
    threads: int  # torch threads of each process
    ranks: int = 1  # processes, data parallel

    def __post_init__(self) -> None:
        if self.ranks < 1 or self.batch_size % self.ranks:
            raise SftscopeError(f"the demo's {self.name} phase splits a batch of "
                                f"{self.batch_size} over {self.ranks} ranks; choose ranks that "
                                "divide the batch size")


class Blocks(torch.utils.data.Dataset):
    """Fixed-length training blocks: ``input_ids`` and ``labels`` (-100 = no loss)."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def train(model, data: Blocks, phase: Phase, work_dir: Path, ranks: Ranks | None = None):
    """Train ``model`` for ``phase``; returns ``(trained model, [[step, loss], ...])``.

    Without ``ranks`` it trains ``model`` in place, in this process; with them, a new model
    comes back from rank 0.
    """
    THREADS[phase.name] = phase.threads * phase.ranks
    if progress_enabled():
        n = f", {phase.ranks} processes" if phase.ranks > 1 else ""
        say(f"[bold]demo pair[/]: training {phase.name} ({phase.steps} steps{n})")
    if ranks is None:
        if phase.ranks > 1:
            raise SftscopeError(f"the demo's {phase.name} phase asks for {phase.ranks} ranks "
                                "but no worker processes were started")
        with torch_threads(phase.threads):
            return model, _run_trainer(model, data, phase, work_dir, phase.batch_size)
    return ranks.train(model, data, phase)


def _run_trainer(model, data: Blocks, phase: Phase, work_dir: Path, per_rank: int,
                 callbacks: tuple[Any, ...] = ()) -> list[list[float]]:
    """``transformers.Trainer`` over ``data`` (``per_rank`` examples a step in each process).

    Data parallel, DDP does not broadcast the buffers before each forward pass: the demo's
    models hold only the rotary frequencies, computed from the config alike in every rank and
    never changed by training, so the broadcast copied equal values (the pair is byte-identical
    with and without it) and cost 20 ms of a 102 ms base step (two ranks of one thread, idle).
    """
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

    from sftscope.progress import trainer_callback

    args = TrainingArguments(
        output_dir=str(work_dir / f"trainer-{phase.name}"), max_steps=phase.steps,
        per_device_train_batch_size=per_rank, learning_rate=phase.lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, int(phase.warmup_frac * phase.steps)),
        weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0, optim=phase.optim,
        logging_steps=max(1, phase.steps // 10), save_strategy="no", report_to="none",
        disable_tqdm=True, seed=phase.seed, data_seed=phase.seed, use_cpu=True,
        dataloader_num_workers=0, ddp_find_unused_parameters=False,
        ddp_broadcast_buffers=False,  # see the docstring
    )
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[trainer_callback(f"demo pair: {phase.name}"), *callbacks])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    with _deterministic(), warnings.catch_warnings():
        # torch 2.13 calls the option deprecated in favour of one that still syncs at init
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated",
                                category=FutureWarning)
        trainer.train()
    model.eval()
    return [[float(h["step"]), float(h["loss"])] for h in trainer.state.log_history if "loss" in h]


@contextlib.contextmanager
def _deterministic():
    """torch's deterministic algorithms while training (warn where an op has none)."""
    was, warn = (torch.are_deterministic_algorithms_enabled(),
                 torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


# ----------------------------------------------------------------------------- data parallel


class Ranks:
    """Worker processes (``python -m sftscope.demo.training``) kept for all of a pair's phases:
    each imports torch and transformers once (about 6 CPU seconds) and joins the gloo group
    once, while the parent prepares the data. A context manager: leaving it ends them."""

    def __init__(self, ranks: int, threads: int, work_dir: Path) -> None:
        self.ranks, self.threads = ranks, threads
        self.dir = Path(tempfile.mkdtemp(prefix="ranks.", dir=work_dir))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "sftscope.demo.training", str(self.dir), str(os.getpid()),
               str(ranks), str(threads)]
        self.procs = [subprocess.Popen([*cmd, str(r)], env=env, stdin=subprocess.PIPE,
                                       text=True) for r in range(ranks)]
        self.jobs = 0
        self.cpu: dict[str, float] = {}  # CPU seconds of each phase, all ranks together

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                p.stdin.close()  # end of jobs: the workers leave their loop
        deadline = time.monotonic() + (30 if exc[0] is None else 0)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
            if p.poll() is None:
                p.terminate()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def train(self, model, data: Blocks, phase: Phase):
        """Train ``model`` on ``data`` in the workers; returns rank 0's model and history."""
        from transformers import AutoModelForCausalLM

        if (phase.ranks, phase.threads) != (self.ranks, self.threads):
            raise SftscopeError(f"the demo's {phase.name} phase wants {phase.ranks} ranks of "
                                f"{phase.threads} threads; the workers are {self.ranks} of "
                                f"{self.threads}")
        self.jobs += 1
        job = self.dir / f"job-{self.jobs}"
        job.mkdir()
        model.save_pretrained(job / "in")
        torch.save({"ids": data.ids, "labels": data.labels}, job / "data.pt")
        write_json(job / "phase.json", dataclasses.asdict(phase))
        for p in self.procs:
            with contextlib.suppress(BrokenPipeError):  # a worker that died: _wait says so
                p.stdin.write(f"{job}\n")
                p.stdin.flush()
        self._wait(job, phase)
        self.cpu[phase.name] = sum(float((job / f"done-{r}").read_text())
                                   for r in range(self.ranks))
        trained = AutoModelForCausalLM.from_pretrained(job / "out", dtype=model.dtype)
        history = read_json(job / "history.json")
        shutil.rmtree(job, ignore_errors=True)
        trained.eval()
        return trained, history

    def _wait(self, job: Path, phase: Phase) -> None:
        """Until every rank has finished ``job``; a rank's failure becomes one error line."""
        while not all((job / f"done-{r}").exists() for r in range(self.ranks)):
            for r, p in enumerate(self.procs):
                if p.poll() in (130, -signal.SIGINT):  # Ctrl-C reached the workers too
                    raise KeyboardInterrupt
                if (job / f"error-{r}.txt").exists() or p.poll() is not None:
                    raise SftscopeError(f"training the demo's {phase.name} phase failed in "
                                        f"worker process {r}: {_worker_error(job, r, p)}")
            time.sleep(0.1)


def _worker_error(job: Path, rank: int, proc: subprocess.Popen) -> str:
    path = job / f"error-{rank}.txt"
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(2)
    if path.exists():
        return path.read_text().strip() or "no message"
    return f"it ended with exit status {proc.poll()} (out of memory?)"


def _serve(pool: Path, parent: int, ranks: int, threads: int, rank: int) -> None:
    """One rank: join the group, then train each job named on stdin until it closes."""
    os.environ.update(WORLD_SIZE=str(ranks), RANK=str(rank), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(max(1, threads))
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading and saving: the parent shows its own
    dist.init_process_group("gloo", init_method=f"file://{pool / 'group'}", rank=rank,
                            world_size=ranks)
    try:
        for line in sys.stdin:
            job, cpu = Path(line.strip()), time.process_time()
            phase = Phase(**read_json(job / "phase.json"))
            model = AutoModelForCausalLM.from_pretrained(job / "in")
            blocks = torch.load(job / "data.pt")
            history = _run_trainer(model, Blocks(blocks["ids"], blocks["labels"]), phase, job,
                                   phase.batch_size // ranks, callbacks=(_orphan_stop(parent),))
            if rank == 0:
                model.save_pretrained(job / "out")
                write_json(job / "history.json", history)
            dist.barrier()
            write_text(job / f"done-{rank}", f"{time.process_time() - cpu:.3f}")  # atomic
    finally:
        dist.destroy_process_group()


def _orphan_stop(parent: int):
    """A TrainerCallback that ends the process when the parent is gone (it was killed)."""
    from transformers import TrainerCallback

    class OrphanStop(TrainerCallback):
        def __init__(self) -> None:
            self.checked = time.monotonic()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if time.monotonic() - self.checked > 1.0:
                self.checked = time.monotonic()
                if os.getppid() != parent:
                    os._exit(3)

    return OrphanStop()


def _main(argv: list[str]) -> int:
    """Entry of a worker process: ``pool_dir parent_pid ranks threads rank``. An error goes to
    the current job's ``error-RANK.txt`` as one line (the parent reports it), never as a
    traceback."""
    from sftscope.errors import quoted
    from sftscope.process import setup_process

    setup_process()
    pool, (parent, ranks, threads, rank) = Path(argv[0]), map(int, argv[1:5])
    try:
        _serve(pool, parent, ranks, threads, rank)
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # noqa: BLE001  (reported by the parent as one line)
        jobs = sorted(pool.glob("job-*"), key=lambda j: int(j.name.split("-")[1]))
        if jobs:
            write_text(jobs[-1] / f"error-{rank}.txt", quoted(e, 300) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
