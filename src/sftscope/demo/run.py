"""``sftscope demo``: the whole pipeline, offline, on a CPU, on a pair it trains itself.

Steps: build (or find cached) the demo Base/SFT pair, then analyze, weights, probe, swap and a
small mask sweep on it (which also ranks the training-free mask proposals), then one report.
Every step writes an ordinary run folder under ``out`` that any other command (and
``sftscope report``) can read; finished work is reused on the next run (cached pair, cached
captures, finished sweep jobs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftscope.config.commands import DEMO_STEPS, DemoConfig, SweepConfig
from sftscope.io import run_record
from sftscope.load.runtime import cpu_cores, torch_threads
from sftscope.process import cpu_seconds
from sftscope.progress import say
from sftscope.runs import check_out, finish_run, releasing

if TYPE_CHECKING:
    from sftscope.demo.pair import DemoPair
    from sftscope.experiments.sweep import LocalShards

STEPS = DEMO_STEPS
THREADS = 1
"""torch threads of the demo's steps after the pair (stages, analyses, sweep, report). The
demo's models are tiny (0.7M parameters): a second thread costs more in OpenMP hand-offs than
it saves in matrix work. A cached demo run on the idle 2-core box: 65 s on one thread, 113 s
on two (sweep 40 s against 83 s, swap 4.9 s against 9.8 s; 2026-12-07). Fixed, not adapted to
the load, so that one seed gives the same numbers however busy the machine is."""
SWEEP_SHARDS = 2
"""processes that share the full demo's sweep jobs (``sweep.LocalShards``, one thread each, at
most the cores), started before analyze. The quick demo runs its few short jobs in this
process, where starting two more Python processes would cost more than they save."""


@dataclass
class DemoResult:
    """Where everything went and how long each step took."""

    out: Path
    report: Path | None
    runs: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds a step, workers too
    pair: dict[str, Any] = field(default_factory=dict)
    patterns: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, Any] = field(default_factory=dict)  # --stages: the DPO and GRPO runs

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Record the wall and the CPU seconds (all threads, ended workers) of step ``name``."""
        t, c = time.perf_counter(), cpu_seconds()
        yield
        self.timings[name] = time.perf_counter() - t
        self.cpu[name] = cpu_seconds() - c


@dataclass(frozen=True)
class _Inputs:
    """What every analysis step of the demo reads: the pair, its data and the sizes."""

    cfg: DemoConfig
    base: str
    sft: str
    test: str
    train: str
    cache: Path
    chain: tuple[str, ...] = ()
    shards: LocalShards | None = None  # the sweep's jobs, started early (``_start_sweep``)

    @property
    def size(self) -> dict[str, int]:
        return self.cfg.sizes


@releasing
def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run every step of the demo and write ``out/report.html`` and ``out/run.json``."""
    out = Path(cfg.out)
    check_out(out, "demo", cfg, overwrite=True)
    res = DemoResult(out=out, report=None)
    t0, c0 = time.perf_counter(), cpu_seconds()
    eta = Eta(cfg, t0)
    pair = _build_pair(cfg, res, eta)
    with torch_threads(THREADS):  # every step after the pair
        _after_pair(cfg, res, eta, pair)
    res.timings["total"] = time.perf_counter() - t0
    res.cpu["total"] = cpu_seconds() - c0
    finish_run(out, run_record(
        "demo", cfg.record(), reduced=cfg.quick, sizes=cfg.sizes, seeds={"demo": cfg.seed},
        pair=res.pair,
        runs={k: str(v) for k, v in res.runs.items()}, timings=res.timings, cpu_seconds=res.cpu,
        stages=res.stages,
        general_text=str(pair.data_files["general"]), patterns=res.patterns))
    return res


def _after_pair(cfg: DemoConfig, res: DemoResult, eta: Eta, pair: DemoPair) -> None:
    """The stages (``--stages``), the analysis steps and the report, their runs into ``res``."""
    out = Path(cfg.out)
    chain = _build_stages(cfg, res, eta, str(pair.sft_dir), pair.data_files["gsm8k_train"])
    inputs = _Inputs(cfg=cfg, base=str(pair.base_dir), sft=str(pair.sft_dir),
                     test=f"gsm8k:{pair.data_files['gsm8k_test']}",
                     train=f"gsm8k:{pair.data_files['gsm8k_train']}", cache=out / "cache",
                     chain=chain)
    with _start_sweep(inputs, out / "sweep") as shards:
        inputs = dataclasses.replace(inputs, shards=shards)
        for name, fn in STEP_RUNNERS.items():
            if name not in cfg.steps:
                continue
            say(f"[bold]demo: {name}[/] ({eta.line(name)})")
            with res.timed(name):
                res.runs[name] = Path(fn(inputs, out / name))
            eta.done(name, res.timings[name])
    if "report" in cfg.steps and res.runs:
        _report(cfg, res)


def _build_pair(cfg: DemoConfig, res: DemoResult, eta: Eta) -> DemoPair:
    """Train (or find cached) the pair; its folders, sizes and timings go into ``res``."""
    from sftscope.demo.pair import build_demo_pair

    say(f"[bold]demo: pair[/] ({eta.line('pair')})")
    with res.timed("pair"):
        pair = build_demo_pair(Path(cfg.out) / ("pair-moe" if cfg.moe else "pair"),
                               seed=cfg.seed, quick=cfg.quick, family=cfg.family,
                               force=cfg.force, moe=cfg.moe)
    eta.done("pair", res.timings["pair"], cached=pair.cached)
    if pair.cached:
        res.timings["pair (cached)"] = res.timings.pop("pair")
        res.cpu["pair (cached)"] = res.cpu.pop("pair")
    res.pair = {"base": str(pair.base_dir), "sft": str(pair.sft_dir), "cached": pair.cached,
                "n_blocks": pair.n_blocks, "n_params": pair.n_params, "metrics": pair.metrics,
                "timings": pair.timings}
    return pair


def _build_stages(cfg: DemoConfig, res: DemoResult, eta: Eta, sft: str,
                  train: Path) -> tuple[str, ...]:
    """``--stages``: DPO then GRPO after the SFT model; the chain of models to analyse."""
    if not cfg.stages:
        return ()
    from sftscope.demo.stages import build_stages, chain_stages

    say(f"[bold]demo: stages[/] DPO then GRPO after the SFT model ({eta.line('stages')})")
    with res.timed("stages"):
        res.stages = build_stages(Path(cfg.out) / "stages", sft, train, seed=cfg.seed,
                                  quick=cfg.quick)
    eta.done("stages", res.timings["stages"])
    return chain_stages(res.stages)


def _analyze(inp: _Inputs, run: Path) -> Path:
    from sftscope.experiments.analyze import AnalyzeConfig, analyze

    analyze(AnalyzeConfig(base=inp.base, sft=inp.sft, data=inp.test, out=str(run),
                          limit=inp.size["n_pooled"], n_token=inp.size["n_token"],
                          max_length=256, batch_size=16, seed=inp.cfg.seed,
                          cache_dir=str(inp.cache), overwrite=True, stages=inp.chain))
    return run


def _weights(inp: _Inputs, run: Path) -> Path:
    from sftscope.experiments.weights import run_weights

    run_weights(run, inp.base, inp.sft, overwrite=True, stages=inp.chain,
                consecutive=bool(inp.chain))
    return run


def _probe(inp: _Inputs, run: Path) -> Path:
    from sftscope.experiments.lens import probe

    probe(data=inp.test, base=inp.base, sft=inp.sft, out=str(run), limit=inp.size["n_probe"],
          seed=inp.cfg.seed, max_length=256, batch_size=16, bootstrap=200, overwrite=True,
          stages=inp.chain)
    return run


def _swap(inp: _Inputs, run: Path) -> Path:
    from sftscope.experiments.swap import swap

    swap(base=inp.base, sft=inp.sft, data=inp.test, out=str(run), segments=inp.cfg.segments,
         limit=inp.size["n_swap"], seed=inp.cfg.seed, max_length=256, batch_size=16,
         bootstrap=200, overwrite=True)
    return run


def _start_sweep(inp: _Inputs, run: Path) -> contextlib.AbstractContextManager[Any]:
    """The full demo's sweep jobs in ``SWEEP_SHARDS`` one-thread processes, started now: they
    run beside analyze, weights, probe and swap, which leave the other core idle."""
    shards = min(SWEEP_SHARDS, cpu_cores())
    if inp.cfg.quick or "sweep" not in inp.cfg.steps or shards < 2:
        return contextlib.nullcontext(None)
    from sftscope.experiments.sweep import LocalShards

    say(f"[bold]demo: sweep[/] started: its jobs run in {shards} processes beside the next steps")
    return LocalShards(_sweep_config(inp, run), shards, threads=THREADS)


def _sweep_config(inp: _Inputs, run: Path) -> SweepConfig:
    cfg, size = inp.cfg, inp.size
    return SweepConfig(
        out=str(run), model=inp.base, train=inp.train, task=inp.test, segments=cfg.segments,
        masks=cfg.sweep_masks, seeds=cfg.sweep_seeds, sft=inp.sft,
        validate_suggest=True,
        tune={"rank": 8, "lr": 2e-3, "max_steps": size["tune_steps"], "batch_size": 16,
              "micro_batch_size": 16, "n_train": size["n_train"], "save_steps": 1000},
        evaluation={"limit": size["eval_limit"], "shots": 0,
                    "max_new_tokens": size["new_tokens"], "batch_size": 16},
        suggest={"limit": min(64, size["n_pooled"])},
    )


def _sweep(inp: _Inputs, run: Path) -> Path:
    from sftscope.experiments.sweep import run_sweep

    sweep = _sweep_config(inp, run)
    if inp.shards is not None:  # the jobs ran in the shards: wait for them, then collect
        inp.shards.wait()
        sweep = dataclasses.replace(sweep, collect=True)
    run_sweep(sweep)
    suggestion = run / "suggest" / "suggest.json"
    if suggestion.is_file():
        from sftscope.io import read_json

        rec = read_json(suggestion)
        say(f"suggested mask {rec.get('mask')} ({rec.get('method')}): {rec.get('reason')}")
    return run


STEP_RUNNERS = {"analyze": _analyze, "weights": _weights, "probe": _probe, "swap": _swap,
                "sweep": _sweep}
"""The analysis steps in the order they run (``report`` reads their run folders)."""


def _report(cfg: DemoConfig, res: DemoResult) -> None:
    """One report over every step's run folder; the paper's patterns go into ``res``."""
    from sftscope.report import build_report, paper_patterns

    with res.timed("report"):
        order = [res.runs[k] for k in STEPS if k in res.runs]
        res.report = build_report(order, out=res.out / "report.html",
                                  figures_dir=res.out / "figures",
                                  title="sftscope demo: a toy "
                                  + ("mixture-of-experts " if cfg.moe else "")
                                  + "Base/SFT pair trained on this CPU"
                                  + (", continued through DPO and GRPO" if cfg.stages else ""),
                                  notices=[reduced_notice(cfg)] if cfg.quick else [])
        res.patterns = paper_patterns(order)


def reduced_notice(cfg: DemoConfig) -> str:
    """What the report of a ``--quick`` demo says first: its numbers measure nothing."""
    from sftscope.report.runs import reduced_notice as notice

    return notice(cfg.sizes)


# Seconds each step took on an idle 2-core machine (`bench/bench_demo.py`, 2026-12-07 15:36-15:40
# UTC, the full pair trained by two worker processes, the sweep's jobs running beside analyze,
# probe and swap; the quick sizes from 2026-11-30 and earlier on 2026-12-07; the README's
# table); the ETA scales the steps still to come by how much slower than this the steps so far
# have been.
REFERENCE_SECONDS = {
    False: {"pair": 198.0, "analyze": 4.0, "weights": 0.3, "probe": 3.9, "swap": 6.4,
            "sweep": 13.0, "report": 5.7},
    True: {"pair": 25.0, "analyze": 0.4, "weights": 0.1, "probe": 0.2, "swap": 0.6,
           "sweep": 8.2, "report": 4.4},
}
# --moe (full: measured the same day; quick: estimates)
MOE_REFERENCE_SECONDS = {
    False: {"pair": 117.0, "analyze": 2.5, "weights": 0.2, "probe": 2.8, "report": 5.5},
    True: {"pair": 25.0, "analyze": 1.0, "weights": 0.2, "probe": 0.4, "report": 5.0},
}
STAGES_SECONDS = {False: 19.0, True: 30.0}  # --stages (full: measured; quick: an estimate)


class Eta:
    """An overall ETA for the demo: reference step times scaled by the observed slowdown."""

    def __init__(self, cfg: DemoConfig, t0: float) -> None:
        ref = dict((MOE_REFERENCE_SECONDS if cfg.moe else REFERENCE_SECONDS)[cfg.quick])
        if cfg.stages:
            ref = {"pair": ref.pop("pair"), "stages": STAGES_SECONDS[cfg.quick], **ref}
        self.ref = {k: v for k, v in ref.items() if k in ("pair", "stages") or k in cfg.steps}
        self.t0 = t0
        self.spent_ref = 0.0
        self.spent = 0.0
        self.left = list(self.ref)

    def done(self, name: str, seconds: float, cached: bool = False) -> None:
        if name in self.left:
            self.left.remove(name)
        if not cached:  # a cached pair says nothing about this machine's speed
            self.spent_ref += self.ref.get(name, 0.0)
            self.spent += seconds

    def line(self, name: str) -> str:
        k = self.left.index(name) + 1 if name in self.left else 0
        n = len(self.ref)
        slow = self.spent / self.spent_ref if self.spent_ref > 0 else 1.0
        rest = sum(self.ref[s] for s in self.left) * slow
        el = time.perf_counter() - self.t0
        return (f"step {n - len(self.left) + min(k, 1)}/{n}, elapsed {el:.0f} s, "
                f"about {rest:.0f} s to go" + ("" if self.spent_ref else " on an idle machine"))


def time_summary(res: DemoResult) -> str:
    """Where the time went, one line per step: wall seconds, share, CPU seconds (all threads and
    the training workers)."""
    total = res.timings.get("total", 0.0) or 1.0
    lines = [f"  {k:<16} {v:7.1f} s  {100 * v / total:5.1f} %  cpu {res.cpu.get(k, 0.0):7.1f} s"
             for k, v in res.timings.items() if k != "total"]
    return "\n".join(lines + [f"  {'total':<16} {total:7.1f} s          "
                              f"cpu {res.cpu.get('total', 0.0):7.1f} s"])
