"""Capture with all metrics vs a bare forward pass over the same batches (target <= 1.10x).

    python bench/bench_capture.py [--family llama --layers 8 --hidden 256 --n 256 --seq 128]
                                  [--threads 2 --repeats 3]

Side by side in one process, interleaved per repeat so a load change hits all alike: the bare
pass (the same inner model, no LM head, the same right-padded batches, no hooks) and capture
with each schedule of the token metrics (``capture.stream.pick_schedule``): ``overlap`` (the
background workers, at the lowest priority, compute the metrics of earlier batches during later
forward passes; what they have not finished when it is wanted goes to the foreground workers),
``inline`` (the forward pass waits for them) and ``auto``, the default (overlap kept where its
background workers keep up on the first two token batches; otherwise both timed on the next
ones, overlap kept unless inline is clearly faster: ``ScheduleProbe``). The output says which
one ``auto`` kept in each repeat and what decided it (``share``: the watch; ``rates``: the
timed plan). ``--profile-metrics`` adds where the token metrics' CPU goes.
Prints the median of the repeats, each ratio to the bare pass (and that of the fastest runs,
which a shared machine disturbs least), the process CPU seconds (paired ratio too: what a
busy machine disturbs less), tokens/s, the load average and peak RSS. The process
is set up as the CLI sets up its own (``OMP_WAIT_POLICY=PASSIVE``, glibc's malloc tuned),
both passes alike.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable

from sftscope.process import setup_process, tune_malloc  # noqa: E402

os.environ.setdefault("SFTSCOPE_NO_PROGRESS", "1")
# as the CLI sets up its process (process.py): the wait policy now, before torch loads (set
# OMP_WAIT_POLICY to compare another one); malloc once the flags are read (--no-tune-malloc)
setup_process(malloc=False)

import torch  # noqa: E402

import sftscope.capture.stream as S  # noqa: E402
from sftscope import metrics as M  # noqa: E402
from sftscope.capture.engine import batches  # noqa: E402
from sftscope.capture.hooks import hidden_state_hooks, inner_model  # noqa: E402
from sftscope.capture.stream import CaptureConfig, capture  # noqa: E402
from sftscope.load.data import TokenizedSet  # noqa: E402
from sftscope.load.tiny import build_tiny_model  # noqa: E402
from sftscope.metric_registry import metric_functions  # noqa: E402


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _token_rows(model, tok: TokenizedSet, a: argparse.Namespace) -> list[torch.Tensor]:
    """The token rows the metric workers get: per sample of the first ``n_token``, its real
    rows at every hidden state, ``[L+1, T_n, D]`` float32."""
    held: list[torch.Tensor] = []
    out: list[torch.Tensor] = []
    with torch.inference_mode(), hidden_state_hooks(model, lambda _j, h: held.append(h)):
        for b in batches(tok, a.batch, 0, list(range(min(a.n_token, len(tok))))):
            held.clear()
            inner_model(model)(input_ids=b.input_ids, attention_mask=b.attention_mask,
                               use_cache=False)
            for r, n in enumerate(b.attention_mask.sum(1).tolist()):
                out.append(torch.stack([h[r, :n] for h in held]))
    return out


def _metric_cpu(rows: list[torch.Tensor], opts: M.MetricOptions) -> None:
    """Thread CPU seconds of each token metric over ``rows`` (one sample at a time, one
    intra-op thread: as a metric worker computes them)."""
    from sftscope.metrics.entropy import TokenBatch

    cpu = {"float64 copy": 0.0, **{f.name: 0.0 for f in metric_functions("token")}}
    for x in rows:
        batch = TokenBatch(x, torch.ones(x.shape[:2], dtype=torch.bool), opts)
        c0 = time.thread_time()
        batch.h64  # noqa: B018  (made once, shared by the metrics that need it)
        cpu["float64 copy"] += time.thread_time() - c0
        for fn in metric_functions("token"):
            c0 = time.thread_time()
            fn.compute(batch)
            cpu[fn.name] += time.thread_time() - c0
    print(f"token metrics' thread CPU over {len(rows)} samples x {rows[0].shape[0]} states: "
          f"{sum(cpu.values()):.3f} s = " + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items()))


def _costliest_ops(rows: list[torch.Tensor], opts: M.MetricOptions) -> None:
    """The token metrics' costliest operators over ``rows``, with one intra-op thread (the
    profiler runs in the main thread: it is set up there)."""
    from torch.profiler import ProfilerActivity, profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for x in rows:
                M.token_metrics_batch(x, torch.ones(x.shape[:2], dtype=torch.bool), opts)
    finally:
        torch.set_num_threads(threads)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print("costliest operators (self CPU share, under the profiler): " + ", ".join(
        f"{e.key} {e.self_cpu_time_total / total:.0%}" for e in ops))


def profile_metrics(model, tok: TokenizedSet, a: argparse.Namespace) -> None:
    """Where the token metrics' CPU goes, in a metric worker (``capture.stream``)."""
    rows = _token_rows(model, tok, a)
    opts = CaptureConfig(batch_size=a.batch, n_token=a.n_token).metric_options()
    with S.sample_pool(1) as pool:
        for x in rows[:8]:  # warm-up
            pool.submit(M.token_metrics_batch, x, torch.ones(x.shape[:2], dtype=torch.bool),
                        opts).result()
        pool.submit(_metric_cpu, rows, opts).result()
    _costliest_ops(rows, opts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", default="llama")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--n", type=int, default=256, help="texts (pooled set)")
    ap.add_argument("--n-token", type=int, default=100, help="texts with token-level metrics")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--check", action="store_true",
                    help="also check every schedule gives the inline numbers, bit for bit")
    ap.add_argument("--profile-metrics", action="store_true",
                    help="also say where the token metrics' CPU goes (per metric, per operator)")
    ap.add_argument("--no-tune-malloc", action="store_true",
                    help="leave glibc's malloc as it is (the CLI tunes it: load/runtime.py)")
    a = ap.parse_args()
    malloc = "untuned" if a.no_tune_malloc else ("tuned" if tune_malloc() else "untunable")
    if a.threads:
        torch.set_num_threads(a.threads)
    model = build_tiny_model(a.family, a.vocab, n_layers=a.layers, hidden=a.hidden,
                             n_heads=max(4, a.hidden // 64), max_positions=a.seq + 8)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(a.seq // 2, a.seq + 1, (a.n,), generator=g).tolist()
    ids = [torch.randint(4, a.vocab, (n,), generator=g).tolist() for n in lengths]
    tok = TokenizedSet(ids, [None] * a.n, 0, a.seq)
    n_tokens = sum(lengths)
    run = inner_model(model)

    def bare() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches(tok, a.batch, 0):
                run(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        return time.perf_counter() - t0

    results = {}
    real_pick = S.pick_schedule
    default = real_pick(None, torch.device("cpu"))
    kept: list[str] = []
    shares: dict[str, list[str]] = {"overlap": [], "auto": []}  # background workers' share

    def full(schedule: str) -> float:
        S.pick_schedule = lambda *_a: schedule  # type: ignore[assignment]
        try:
            t0 = time.perf_counter()
            results[schedule] = capture(model, tok, CaptureConfig(batch_size=a.batch,
                                                                  n_token=a.n_token), 0)
            seconds = time.perf_counter() - t0
            info = results[schedule].info
            if schedule == "auto":
                probe = info.get("schedule_probe") or {}
                kept.append(f"{info.get('token_metrics')} ({probe.get('kept_by')})")
            if schedule in shares:
                shares[schedule].append(f"{info.get('background_share', 0.0):.2f}")
            return seconds
        finally:
            S.pick_schedule = real_pick

    load_before = _load()
    schedules = ["overlap", "inline", "auto"]
    bare()  # warm-up
    for sch in schedules:
        full(sch)
    times: dict[str, list[float]] = {"bare": [], **{sch: [] for sch in schedules}}
    cpu: dict[str, list[float]] = {k: [] for k in times}  # process CPU seconds of each run

    def timed(k: str, run: Callable[[], float]) -> None:
        c0 = time.process_time()
        times[k].append(run())
        cpu[k].append(time.process_time() - c0)

    for r in range(a.repeats):  # the order rotates: none always runs first after the bare pass
        timed("bare", bare)
        for sch in schedules[r % 3:] + schedules[:r % 3]:
            timed(sch, lambda sch=sch: full(sch))
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in model.parameters()) / 1e6
    pooled_mb = 2 * (a.layers + 1) * a.n * a.hidden * 4 / 2**20
    print(f"model: {a.family} {a.layers} blocks, hidden {a.hidden}, {params:.1f}M params; "
          f"{a.n} texts, {n_tokens} tokens, batch {a.batch}, token metrics on {a.n_token}; "
          f"threads {torch.get_num_threads()}; median of {a.repeats}")
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, malloc {malloc}; "
          f"load average before {load_before}, after {_load()}")
    labels = {"bare": "bare forward", **{sch: f"capture ({sch})" for sch in schedules}}
    best = {k: min(v) for k, v in times.items()}
    # each capture over the bare pass of its own repeat: a slow drift of the machine's speed
    # (a shared host) cancels out of these
    paired = {k: statistics.median(x / b for x, b in zip(v, times["bare"], strict=True))
              for k, v in times.items()}
    for k, v in med.items():
        runs = ", ".join(f"{x:.2f}" for x in times[k])
        cpu_paired = statistics.median(x / b for x, b in zip(cpu[k], cpu["bare"], strict=True))
        print(f"{labels[k]:22s} {v:7.2f} s  {n_tokens / v:9.0f} tok/s  "
              f"ratio {v / med['bare']:6.3f}x, paired {paired[k]:6.3f}x  (runs: {runs}; "
              f"ratio of the fastest runs {best[k] / best['bare']:.3f}x); process CPU "
              f"{statistics.median(cpu[k]):.2f} s, paired {cpu_paired:.3f}x")
    print(f"default here: {labels[default]}, kept {', '.join(kept[1:])} ({os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads) -> {med[default] / med['bare']:.3f}x, paired "
          f"{paired[default]:.3f}x (target <= 1.10x)")
    print(f"share of the overlapped samples' metrics the background workers computed: overlap "
          f"{', '.join(shares['overlap'][1:])}; auto {', '.join(shares['auto'][1:])}")
    print(f"pooled buffers    {pooled_mb:7.1f} MiB (mean + last, [L+1, N, D] float32)")
    print(f"peak RSS          {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:7.0f} "
          f"MiB")
    if a.profile_metrics:
        profile_metrics(model, tok, a)
    if a.check:
        x = results["inline"]
        for sch in ("overlap", "auto"):
            y = results[sch]
            same = torch.equal(x.pooled_mean, y.pooled_mean) and all(
                torch.equal(x.token[k].nan_to_num(7.0), y.token[k].nan_to_num(7.0))
                for k in x.token)
            print(f"{sch} == inline, bit for bit: {same}")


if __name__ == "__main__":
    main()
