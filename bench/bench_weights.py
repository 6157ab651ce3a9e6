"""Benchmark of ``sftscope weights``: streaming throughput vs plain sequential reads, peak memory.

Writes two random bf16 llama-shaped checkpoints (sharded, with ``model.safetensors.index.json``)
of about ``--size`` each to a temporary folder, then measures, in fresh subprocesses:

* sequential read throughput of both checkpoints (every byte, 16 MiB reads): *cold* after
  evicting the files from the page cache with ``posix_fadvise(DONTNEED)`` (no root needed; the
  host may still cache the virtual disk, hence "cold-ish"), and *warm* (a second read);
* ``weight_change(base, sft, low_rank=False)`` throughput (checkpoint bytes / wall time), cold
  and warm, as a fraction of the matching read throughput (target >= 80 % of the cold read);
* peak RSS of the ``weight_change`` call (sampled every 2 ms, and ``ru_maxrss``) above the RSS
  just before it, against the largest tensor's size;
* optionally (``--low-rank``) the time with the low-rank metrics on.

Usage: ``python bench/bench_weights.py --size 400MB`` (``--keep DIR`` keeps the checkpoints).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1 << 20


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise SystemExit(f"--size {text!r}: use e.g. 400MB or 1.5GB")
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": MB, "g": 1 << 30,
                                      "t": 1 << 40}[m.group(2)])


def layout(target_bytes: int, hidden: int, vocab: int) -> dict:
    """Llama-shaped config with about ``target_bytes`` of bf16 weights."""
    inter = int(hidden * 8 / 3) // 64 * 64
    per_block = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((target_bytes / 2 - fixed) / per_block))
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=2048)


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out = [("model.embed_tokens.weight", (v, h))]
    for b in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{b}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (h, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_pair(root: Path, cfg: dict, shard_bytes: int) -> tuple[Path, Path]:
    """Base = random bf16; SFT = base + small noise; both sharded with an index."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    base, sft = root / "base", root / "sft"
    for d in (base, sft):
        d.mkdir(parents=True, exist_ok=True)
        LlamaConfig(**cfg).save_pretrained(d)
    gen = torch.Generator().manual_seed(0)
    shapes = tensor_shapes(cfg)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = math.prod(shape) * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    maps: dict[str, str] = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tb, ts = {}, {}
        for name, shape in shard:
            w = torch.randn(shape, generator=gen) * 0.02
            tb[name] = w.to(torch.bfloat16)
            ts[name] = (w + 1e-3 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
            maps[name] = fname
        for d, tensors in ((base, tb), (sft, ts)):
            save_file(tensors, d / fname, metadata={"format": "pt"})
    total = sum(math.prod(s) * 2 for _, s in shapes)
    for d in (base, sft):
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": maps}))
        for f in d.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    return base, sft


def files_of(*dirs: Path) -> list[Path]:
    return sorted(f for d in dirs for f in d.glob("*.safetensors"))


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages; works without root)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(files: list[Path], prefetch: bool = False) -> tuple[int, float]:
    """Read every byte (16 MiB ``readinto``); ``prefetch`` first asks the kernel for each whole
    file (``POSIX_FADV_WILLNEED``: many requests in flight, what ``weight_change`` does)."""
    buf = bytearray(16 * MB)
    view = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            if prefetch:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
            while k := fh.readinto(view):
                n += k
    return n, time.perf_counter() - t0


# --------------------------------------------------------------------------- worker


def worker(base: str, sft: str, low_rank: bool, cold: bool) -> None:
    """Time ``weight_change`` in this fresh process (a first, untimed call warms up the code
    paths; the files are evicted again before the timed call when ``cold``); print timing and
    memory as JSON."""
    import resource
    import threading

    os.environ["SFTSCOPE_NO_PROGRESS"] = "1"
    from transformers import AutoConfig

    from sftscope.experiments.weights import weight_change

    AutoConfig.from_pretrained(base)  # import costs out of the timing
    t0 = time.perf_counter()
    weight_change(base, sft, low_rank=low_rank)
    first = time.perf_counter() - t0
    if cold:
        evict(files_of(Path(base), Path(sft)))

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    df = weight_change(base, sft, low_rank=low_rank)
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    print(json.dumps({
        "seconds": dt, "first_call_seconds": first, "rss_before": before,
        "rss_peak_sampled": peak[0],
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "bytes_read": df.attrs["bytes_read"], "rows": len(df),
        "timings": df.attrs["timings"],
    }))


def run_worker(base: Path, sft: Path, low_rank: bool = False, cold: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(base), str(sft)]
    if low_rank:
        cmd.append("--low-rank")
    if cold:
        cmd.append("--cold")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="400MB", help="bytes per checkpoint, e.g. 400MB, 2GB")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard", default="100MB", help="shard size")
    ap.add_argument("--low-rank", action="store_true", help="also time low_rank=True")
    ap.add_argument("--repeat", type=int, default=3, help="alternating read/run repetitions")
    ap.add_argument("--keep", type=Path, default=None,
                    help="write the checkpoints here and keep them (reused when they match)")
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=2, metavar=("BASE", "SFT"), help=argparse.SUPPRESS)
    ap.add_argument("--write", nargs=2, metavar=("ROOT", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker, low_rank=args.low_rank, cold=args.cold)
        return
    if args.write:
        write_pair(Path(args.write[0]), json.loads(args.write[1]), parse_size(args.shard))
        return

    cfg = layout(parse_size(args.size), args.hidden, args.vocab)
    root = args.keep or Path(tempfile.mkdtemp(prefix="sftscope-bench-"))
    try:
        t0 = time.perf_counter()
        stamp = root / "bench-config.json"
        stamp_text = json.dumps({"config": cfg, "shard": args.shard})
        if not (stamp.is_file() and stamp.read_text() == stamp_text):
            # Written by a child process: this one stays small, so that the workers' ru_maxrss
            # (which Linux carries over from the parent at fork) measures the workers alone.
            subprocess.run([sys.executable, __file__, "--write", str(root), json.dumps(cfg),
                            "--shard", args.shard], check=True)
            stamp.write_text(stamp_text)
        base, sft = root / "base", root / "sft"
        files = files_of(base, sft)
        total = sum(f.stat().st_size for f in files)
        largest = max(cfg["vocab_size"] * cfg["hidden_size"],
                      cfg["intermediate_size"] * cfg["hidden_size"]) * 2
        print(f"checkpoints: 2 x {total / 2 / MB:.0f} MiB bf16 ({cfg['num_hidden_layers']} "
              f"blocks, hidden {cfg['hidden_size']}, {len(files) // 2} shards each), written "
              f"in {time.perf_counter() - t0:.1f} s to {root}")
        reps = []
        for _ in range(args.repeat):  # alternate reads and runs: shared disks and CPUs drift
            evict(files)
            n, t_plain = read_all(files)
            evict(files)
            _, t_pre = read_all(files, prefetch=True)
            _, t_warm = read_all(files)
            cold = run_worker(base, sft, cold=True)
            warm = run_worker(base, sft)
            # The read speed to beat: the better of a plain and a prefetched sequential read.
            reps.append({"read_cold": n / min(t_plain, t_pre), "read_warm": n / t_warm,
                         "read_cold_plain": n / t_plain, "read_cold_prefetch": n / t_pre,
                         "wc_cold": cold["bytes_read"] / cold["seconds"],
                         "wc_warm": warm["bytes_read"] / warm["seconds"],
                         "cold": cold, "warm": warm})
        med = {k: statistics.median(r[k] for r in reps)
               for k in ("read_cold", "read_warm", "wc_cold", "wc_warm")}
        for r in reps:
            print(f"  rep: read cold {r['read_cold'] / MB:,.0f} (plain "
                  f"{r['read_cold_plain'] / MB:,.0f}, prefetched "
                  f"{r['read_cold_prefetch'] / MB:,.0f}) / warm {r['read_warm'] / MB:,.0f}"
                  f" MiB/s; weight_change cold {r['wc_cold'] / MB:,.0f} "
                  f"({100 * r['wc_cold'] / r['read_cold']:.0f}%) / warm "
                  f"{r['wc_warm'] / MB:,.0f} ({100 * r['wc_warm'] / r['read_warm']:.0f}%) MiB/s")
        print(f"sequential read (median of {len(reps)}): cold {med['read_cold'] / MB:,.0f} MiB/s,"
              f" warm {med['read_warm'] / MB:,.0f} MiB/s")
        for label in ("cold", "warm"):
            tput, r = med[f"wc_{label}"], med[f"read_{label}"]
            ratio = statistics.median(x[f"wc_{label}"] / x[f"read_{label}"] for x in reps)
            print(f"weight_change (no low-rank), {label}: {tput / MB:,.0f} MiB/s = "
                  f"{100 * tput / r:.0f}% of the {label} read (medians); median of the per-rep "
                  f"ratios {100 * ratio:.0f}%")
        growth = max(x[k]["rss_peak_sampled"] - x[k]["rss_before"] for x in reps
                     for k in ("cold", "warm"))
        maxrss = max(x[k]["ru_maxrss"] for x in reps for k in ("cold", "warm"))
        before = reps[0]["cold"]["rss_before"]
        print(f"peak RSS during the call: +{growth / MB:.0f} MiB over {before / MB:.0f} MiB "
              f"(ru_maxrss of the whole worker {maxrss / MB:.0f} MiB); largest tensor "
              f"{largest / MB:.1f} MiB: growth = {growth / largest:.1f} x largest tensor")
        res = {"reps": reps, "median": med}
        if args.low_rank:
            lr = run_worker(base, sft, low_rank=True)
            res["low_rank"] = lr
            t = lr["timings"]
            print(f"weight_change with low-rank metrics (warm): {lr['seconds']:.1f} s (SVD jobs "
                  f"{t.get('low_rank_cpu', 0):.1f} s summed over workers, streaming waited "
                  f"{t.get('low_rank_wait', 0):.1f} s for them)")
        print(json.dumps({"config": cfg, "bytes": total, **res}))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
