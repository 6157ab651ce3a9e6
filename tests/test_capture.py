"""The capture engine: content fingerprints, cache keys, exact resume, interrupts, the NaN guard,
the shared hooked loop and the overlapped token metrics."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from dataclasses import replace

import pytest
import torch

from sftscope.capture import engine as E
from sftscope.capture import stream as S
from sftscope.capture.stream import CaptureConfig, cache_key, capture, partial_path
from sftscope.config.ingredients import device_name
from sftscope.errors import INTERRUPTED_MESSAGE, Interrupted, SftscopeError
from sftscope.experiments.analyze import AnalyzeConfig, analyze
from sftscope.load import data as D
from sftscope.load import identity as LM
from sftscope.load.arch import block_output, get_blocks
from sftscope.load.identity import file_digest, fingerprint
from sftscope.load.models import load_model
from sftscope.load.runtime import resolve_device, resolve_dtype
from sftscope.load.tiny import build_tiny_model

TEXTS = ["The quick brown fox jumps over the lazy dog twice.", "12 plus 7 is 19", "a b",
         "Natalia sold clips to 48 of her friends in April.", "#### 72 The sum", "x y z",
         "A train travels 60 miles in 1 hour.", "one two three four five six seven",
         "Tom has 3 apples", "9 8 7 6 5 4 3 2 1"]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    model = build_tiny_model("llama", len(tokenizer), n_layers=3, hidden=32)
    tok = D.tokenize([D.Sample(t) for t in TEXTS], tokenizer, 40)
    return model, tok, tokenizer.pad_token_id


def _same(a: S.CaptureResult, b: S.CaptureResult, exact: bool = True) -> None:
    kw = {} if not exact else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(a.pooled_mean, b.pooled_mean, **kw)
    torch.testing.assert_close(a.pooled_last, b.pooled_last, **kw)
    for k in a.token:
        torch.testing.assert_close(a.token[k], b.token[k], equal_nan=True, **kw)


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_covers_every_byte_and_memoises(model_dir, tmp_path, monkeypatch):
    src = model_dir("llama")
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    big = folder / "model.safetensors"
    with open(big, "ab") as f:  # > 2 MiB, so the middle is outside the first and last MiB
        f.write(b"\0" * (3 << 20))
    memo = tmp_path / "memo"
    fp0 = fingerprint(str(folder), memo_dir=memo)
    assert fp0["local"] and fp0["files"] >= 4 and (memo / "file-digests.json").is_file()

    calls = []
    real = LM.file_digest
    monkeypatch.setattr(LM, "file_digest", lambda p, *a, **k: calls.append(p) or real(p))
    assert fingerprint(str(folder), memo_dir=memo)["hash"] == fp0["hash"]
    assert calls == []  # every file came from the memo

    size = big.stat().st_size
    with open(big, "r+b") as f:  # one byte in the middle, size unchanged
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 1]))
    fp1 = fingerprint(str(folder), memo_dir=memo)
    assert fp1["hash"] != fp0["hash"]
    assert [os.path.basename(p) for p in calls] == ["model.safetensors"]  # only it re-read

    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text() + " ")
    assert fingerprint(str(folder), memo_dir=memo)["hash"] != fp1["hash"]

    other = tmp_path / "copy"  # the same content elsewhere is the same model
    shutil.copytree(folder, other)
    assert fingerprint(str(other), memo_dir=memo)["hash"] == fingerprint(
        str(folder), memo_dir=memo)["hash"]


def test_file_digest_is_the_same_with_any_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(LM, "_CHUNK", 1 << 16)
    p = tmp_path / "w.bin"
    p.write_bytes(os.urandom(300_000))
    d1 = file_digest(p, workers=1)
    assert d1 == file_digest(p, workers=3) == file_digest(p)
    empty = tmp_path / "e.bin"
    empty.write_bytes(b"")
    assert len(file_digest(empty)) == 64


def test_hub_fingerprint_uses_the_commit():
    sha = "0123456789abcdef0123456789abcdef01234567"
    fp = fingerprint("org/model", revision=sha)
    assert fp["commit"] == sha and not fp["local"] and fp["hash"]
    assert fingerprint("org/model", revision=sha)["hash"] != fingerprint(
        "org/other", revision=sha)["hash"]


def test_hub_fingerprint_resolves_a_branch_from_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fp = fingerprint("org/tiny")
    assert fp["commit"] == commit and fp["revision"] is None
    assert fp["hash"] == fingerprint("org/tiny", revision=commit)["hash"]
    assert "hash" not in fingerprint("org/absent")  # unresolvable: no content identity


# ----------------------------------------------------------------------------- validation


def test_dtype_and_device_validators():
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(SftscopeError, match="unknown dtype 'int7'"):
        resolve_dtype("int7", "cpu")
    assert device_name("cpu") is None and device_name("cuda:1") is None
    for bad in ("gpu", "cpu:1", "cuda:x", ""):
        assert "is not a device" in (device_name(bad) or "")
    if not torch.cuda.is_available():
        with pytest.raises(SftscopeError, match="no CUDA GPU is visible"):
            resolve_device("cuda")


def test_bad_batch_size_refused_before_work(tiny):
    model, tok, pad = tiny
    with pytest.raises(SftscopeError, match="batch-size"):
        CaptureConfig(batch_size=0)
    with pytest.raises(SftscopeError, match="checkpoint-every"):
        CaptureConfig(checkpoint_every=-1)
    with pytest.raises(SftscopeError, match="batch-size"):
        E.run_hooked(model, tok, -1, pad, None)  # type: ignore[arg-type]


def test_cache_key_covers_what_changes_states(tiny):
    _, tok, _ = tiny
    fp = {"hash": "abc", "source": "/somewhere"}
    cfg = CaptureConfig()
    load = {"dtype": "float32", "device": "cpu"}
    data = {"max_length": 40, "chat_template": False, "template": None, "text_field": None}
    base = cache_key(fp, tok, cfg, load=load, data=data, pad_id=0)
    assert base == cache_key({**fp, "source": "/elsewhere"}, tok, cfg, load=load, data=data,
                             pad_id=0)  # content, not the path
    assert base == cache_key(fp, tok, replace(cfg, batch_size=3, checkpoint_every=1,
                                              overlap=False), load=load, data=data, pad_id=0)
    variants = [
        cache_key({**fp, "hash": "abd"}, tok, cfg, load=load, data=data, pad_id=0),
        cache_key(fp, tok, cfg, load={**load, "dtype": "bfloat16"}, data=data, pad_id=0),
        cache_key(fp, tok, cfg, load={**load, "device": "cuda"}, data=data, pad_id=0),
        cache_key(fp, tok, cfg, load=load, data={**data, "max_length": 41}, pad_id=0),
        cache_key(fp, tok, cfg, load=load, data={**data, "chat_template": True}, pad_id=0),
        cache_key(fp, tok, cfg, load=load, data=data, pad_id=1),
        cache_key(fp, D.TokenizedSet(tok.input_ids[:-1] + [tok.input_ids[-1][:-1]],
                                     tok.prompt_lengths, 0, 40), cfg, load=load, data=data,
                  pad_id=0),
        *[cache_key(fp, tok, replace(cfg, **kw), load=load, data=data, pad_id=0)
          for kw in ({"n_token": 5}, {"alpha": 2.0}, {"normalisation": "logN"},
                     {"ridge": 1e-3}, {"sparsity_eps": 0.1}, {"include_padding": True})],
    ]
    assert len({base, *variants}) == len(variants) + 1


def _cfg(base, sft, data, out, cache, **kw) -> AnalyzeConfig:
    kw = {"n_token": 4, "limit": 6, "max_length": 48, "batch_size": 3, "device": "cpu", **kw}
    return AnalyzeConfig(base=str(base), sft=str(sft), data=str(data), out=str(out),
                         cache_dir=str(cache), **kw)


def test_analyze_dtype_device_and_cache(model_dir, gsm8k_file, tmp_path, monkeypatch):
    base, sft = model_dir("llama", seed=0), model_dir("llama", seed=1)
    data = f"gsm8k:{gsm8k_file}"
    cache = tmp_path / "c"
    analyze(_cfg(base, sft, data, tmp_path / "a", cache))
    files = sorted(cache.glob("states-*.safetensors"))
    assert len(files) == 2
    # bad dtype / device: refused although a valid cache exists for the rest
    for kw, needle in (({"dtype": "int7"}, "unknown --dtype"),
                       ({"device": "gpu"}, "is not a device")):
        with pytest.raises(SftscopeError, match=needle):
            analyze(_cfg(base, sft, data, tmp_path / "x", cache, **kw))
    if not torch.cuda.is_available():
        with pytest.raises(SftscopeError, match="no CUDA GPU is visible"):
            analyze(_cfg(base, sft, data, tmp_path / "x", cache, device="cuda"))
    # auto on a CPU is float32: the same cache files
    seen = []
    monkeypatch.setattr("sftscope.experiments.analyze.capture",
                        lambda *a, **k: seen.append(1) or S.capture(*a, **k))
    analyze(_cfg(base, sft, data, tmp_path / "b", cache, dtype="float32"))
    assert seen == []
    # bfloat16 never gets the float32 states
    analyze(_cfg(base, sft, data, tmp_path / "bf", cache, dtype="bf16"))
    assert len(seen) == 2 and len(list(cache.glob("states-*.safetensors"))) == 4
    import json

    rec = json.loads((tmp_path / "bf" / "run.json").read_text())
    assert rec["capture"]["base"]["load"]["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- resume


def _interrupt_after(monkeypatch, model, calls_before: int, sig: int | None = None) -> None:
    real = type(model.model).forward
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == calls_before + 1:
            if sig is None:
                raise KeyboardInterrupt
            os.kill(os.getpid(), sig)
        return real(self, *a, **k)

    monkeypatch.setattr(type(model.model), "forward", flaky)


@pytest.mark.parametrize("first,second", [(2, 3), (3, 1), (1, 10)])
def test_resume_with_another_batch_size_is_exact(tiny, tmp_path, monkeypatch, first, second):
    model, tok, pad = tiny
    full = capture(model, tok, CaptureConfig(batch_size=second, n_token=6), pad)
    path = tmp_path / "states.safetensors"
    _interrupt_after(monkeypatch, model, 2)
    with pytest.raises(Interrupted) as e:
        capture(model, tok, CaptureConfig(batch_size=first, n_token=6, checkpoint_every=1e9),
                pad, cache_path=path)
    assert str(e.value) == INTERRUPTED_MESSAGE
    assert not path.exists() and partial_path(path).exists()
    done = S._read(partial_path(path))[0]["done"]
    assert int(done.sum()) == 2 * first and bool(done[: 2 * first].all())
    monkeypatch.undo()
    resumed = capture(model, tok, CaptureConfig(batch_size=second, n_token=6), pad,
                      cache_path=path)
    assert resumed.info["resumed_samples"] == 2 * first
    assert path.exists() and not partial_path(path).exists()
    assert bool((resumed.pooled_mean.abs().sum(-1) > 0).all())  # no sample left at zero
    _same(resumed, full, exact=False)  # other batches pad differently: rounding only
    again = S.load_cached(path)
    _same(again, resumed)


def test_sigterm_checkpoints_and_interrupts(tiny, tmp_path, monkeypatch):
    model, tok, pad = tiny
    path = tmp_path / "states.safetensors"
    _interrupt_after(monkeypatch, model, 1, sig=signal.SIGTERM)
    old = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="^interrupted; run the same command again"):
        capture(model, tok, CaptureConfig(batch_size=4, n_token=6), pad, cache_path=path)
    assert signal.getsignal(signal.SIGTERM) is old
    assert int(S._read(partial_path(path))[0]["done"].sum()) == 4
    monkeypatch.undo()
    ref = capture(model, tok, CaptureConfig(batch_size=4, n_token=6), pad)
    _same(capture(model, tok, CaptureConfig(batch_size=4, n_token=6), pad, cache_path=path),
          ref)


def test_timed_checkpoints(tiny, tmp_path, monkeypatch):
    model, tok, pad = tiny
    path = tmp_path / "states.safetensors"
    saved = []
    real = S._save
    monkeypatch.setattr(S, "_save", lambda p, t, m: saved.append((p, m.get("done"))) or
                        real(p, t, m))
    capture(model, tok, CaptureConfig(batch_size=3, n_token=6, checkpoint_every=0), pad,
            cache_path=path)
    parts = [d for p, d in saved if p == partial_path(path)]
    assert parts == [3, 6, 9, 10] and saved[-1][0] == path


# ----------------------------------------------------------------------------- NaN guard


def _poison(model, block: int, row: int, pos: int):
    def hook(_mod, _args, out):
        block_output(out)[row, pos] = float("nan")

    return get_blocks(model)[block].register_forward_hook(hook)


def test_nan_at_a_real_token_stops_and_caches_nothing(tiny, tmp_path):
    model, tok, pad = tiny
    path = tmp_path / "states.safetensors"
    handle = _poison(model, 1, 0, 1)
    try:
        with pytest.raises(SftscopeError) as e:
            capture(model, tok, CaptureConfig(batch_size=4, n_token=6, checkpoint_every=0),
                    pad, cache_path=path, label="sft")
        msg = str(e.value)
        assert msg.startswith("sft: hidden state 2 (output of block 1) has NaN or Inf")
        assert "\n" not in msg
        assert not path.exists() and not partial_path(path).exists()
        from sftscope.experiments.suggest import hidden_profile

        with pytest.raises(SftscopeError, match="hidden state 2"):
            hidden_profile(model, tok, 4, pad, label="base")
    finally:
        handle.remove()


def test_nan_at_a_padded_position_is_harmless(tiny):
    model, tok, pad = tiny
    ref = capture(model, tok, CaptureConfig(batch_size=10, n_token=10), pad)
    short = min(range(len(tok)), key=lambda i: len(tok.input_ids[i]))
    width = max(len(x) for x in tok.input_ids)
    # a padded slot of the shortest text, at the last block: no later layer reads it (an
    # earlier one would reach real tokens through attention, 0 * NaN being NaN)
    handle = _poison(model, len(get_blocks(model)) - 1, short, width - 1)
    try:
        got = capture(model, tok, CaptureConfig(batch_size=10, n_token=10), pad)
    finally:
        handle.remove()
    _same(got, ref)


# ----------------------------------------------------------------------------- the engine


def test_overlap_gives_identical_numbers(tiny):
    model, tok, pad = tiny
    for bs in (1, 3, 10):
        a = capture(model, tok, CaptureConfig(batch_size=bs, n_token=7, overlap=True), pad)
        b = capture(model, tok, CaptureConfig(batch_size=bs, n_token=7, overlap=False), pad)
        _same(a, b)
        assert bool(torch.isnan(a.token["curvature"][:, 7:]).all())


def test_background_jobs_are_taken_over_when_wanted():
    """A job the background workers have not finished when its result is wanted is run by
    the foreground ones: a queued one moves there, a running one runs there again."""
    from concurrent.futures import ThreadPoolExecutor

    release = threading.Event()
    bg = ThreadPoolExecutor(1, thread_name_prefix="bg")
    fg = ThreadPoolExecutor(1, thread_name_prefix="fg")
    started = threading.Event()

    def work(x: int) -> tuple[int, str]:
        if threading.current_thread().name.startswith("bg"):
            started.set()
            release.wait(10)  # a background worker the machine leaves no cycles
        return x * x, threading.current_thread().name[:2]

    try:
        running = S._Job(bg, 1, work, 3, rescue=fg)
        started.wait(10)
        queued = S._Job(bg, 1, work, 4, rescue=fg)
        assert not running.done() and not queued.done()
        S.hurry([queued, running])
        assert running.result() == (9, "fg") and queued.result() == (16, "fg")
        assert queued._runs[0].done() and len(queued._runs) == 1  # it moved
        release.set()
        plain = S._Job(fg, 1, work, 5)  # no rescue: just its pool
        assert plain.result() == (25, "fg")
    finally:
        release.set()
        bg.shutdown()
        fg.shutdown()


def test_overlap_without_background_cycles_gives_identical_numbers(tiny, monkeypatch):
    """Background workers that never get to run (a busy machine) cost a wait on the
    foreground ones, never other numbers: here every batch stays pending (``LAG_BYTES``
    allows it) until the end, where the foreground workers take them all; and one batch
    behind (``LAG_BYTES = 0``) with background workers that run, the same numbers again."""
    from concurrent.futures import ThreadPoolExecutor

    model, tok, pad = tiny
    cfg = CaptureConfig(batch_size=2, n_token=7, overlap=False)
    inline = capture(model, tok, cfg, pad)
    blocked = threading.Event()
    real = S.sample_pool

    def pool(workers: int, background: bool = False) -> ThreadPoolExecutor:
        if not background:
            return real(workers)
        p = ThreadPoolExecutor(1)
        p.submit(blocked.wait, 30)
        return p

    monkeypatch.setattr(S, "sample_pool", pool)
    try:
        starved = capture(model, tok, replace(cfg, overlap=True), pad)
    finally:
        blocked.set()
    _same(starved, inline)
    assert starved.info["background_share"] == 0.0  # run.json: the foreground did them all
    assert "background_share" not in inline.info
    monkeypatch.setattr(S, "sample_pool", real)
    monkeypatch.setattr(S, "LAG_BYTES", 0)
    _same(capture(model, tok, replace(cfg, overlap=True), pad), inline)


def test_probe_keeps_overlap_unless_inline_is_clearly_faster():
    def choice(inline_s: float, overlap_s: float) -> str | None:
        p = S.ScheduleProbe()
        for step in p.PLAN:
            p.start(10)
            if step is not None:
                t0 = S.time.perf_counter() - (inline_s if step == "inline" else overlap_s)
                p._timing = (step, t0, 10)
            p.finish()
        return p.choice

    assert choice(1.0, 0.9) == "overlap"
    assert choice(0.95, 1.0) == "overlap"  # within the margin
    assert choice(0.8, 1.0) == "inline"


def test_probe_keeps_overlap_at_once_where_the_background_keeps_up():
    """After the watch, a background share of at least ``KEEP_SHARE`` keeps overlap with no
    batch run inline; a lower one (or none collected) goes on to the timed plan."""
    def run(share: float | None) -> S.ScheduleProbe:
        p = S.ScheduleProbe()
        modes = []
        for _ in p.PLAN:
            modes.append(p.mode())
            p.start(10)
            p.finish(share)
        p.modes = modes  # type: ignore[attr-defined]
        return p

    kept = run(S.ScheduleProbe.KEEP_SHARE)
    assert kept.choice == "overlap" and kept.kept_by == "share" and kept.k == kept.WATCH
    assert "inline" not in kept.modes  # type: ignore[attr-defined]
    assert kept.info()["watch_share"] == S.ScheduleProbe.KEEP_SHARE
    assert all(step is None for step in S.ScheduleProbe.PLAN[:S.ScheduleProbe.WATCH])
    for share in (0.0, S.ScheduleProbe.KEEP_SHARE - 0.01, None):
        timed = run(share)
        assert timed.kept_by == "rates" and timed.k == len(timed.PLAN)
        assert "inline" in timed.modes  # type: ignore[attr-defined]


class _AcceleratorSchedule(S._Reducer):
    """The accelerator schedule (hidden state by hidden state, all samples) run on the CPU."""

    def __init__(self, *a, **k):
        super().__init__(*a, **{**k, "device_type": "accelerator"})


@pytest.mark.parametrize("preset", ["default", "reference"])
def test_cpu_and_accelerator_schedules_equal_the_batched_definitions(tokenizer, monkeypatch,
                                                                    preset):
    """The CPU schedule (each sample over every hidden state, in worker threads) and the
    accelerator one (each hidden state over the batch) give the numbers of
    ``token_metrics_batch`` on the padded states: samples longer than D (the D x D Gram), of 1
    and 2 tokens (undefined metrics) and a sparsity group split over batches included."""
    import sftscope.metrics as M

    model = build_tiny_model("llama", len(tokenizer), n_layers=2, hidden=16, n_heads=2)
    g = torch.Generator().manual_seed(1)
    lengths = [40, 3, 1, 25, 2, 17, 33, 9, 5]
    ids = [torch.randint(4, len(tokenizer), (n,), generator=g).tolist() for n in lengths]
    tok = D.TokenizedSet(ids, [None] * len(ids), 0, 40)
    reference = preset == "reference"
    cfg = CaptureConfig(batch_size=4, n_token=len(ids), include_padding=reference,
                        sparsity_group=3 if reference else 1, entropy_normalisations=("raw",),
                        ridge=1e-6 if reference else 0.0,
                        curvature_zero_steps="right_angle" if reference else "skip")
    opts = cfg.metric_options()
    states: dict[int, list] = {}

    class Keep:
        def start(self, batch):
            self.batch = batch

        def __call__(self, j, h):
            m = torch.ones_like(self.batch.mask) if reference else self.batch.mask
            states.setdefault(j, []).append((h.clone(), m, self.batch.index))

        def finish(self, batch):
            pass

    E.run_hooked(model, tok, cfg.batch_size, 0, Keep())
    want = {k: torch.full((len(states), len(ids)), float("nan"), dtype=torch.float64)
            for k in M.token_metric_names(opts)}
    for j, parts in states.items():
        for h, m, index in parts:
            for k, v in M.token_metrics_batch(h, m, opts).items():
                want[k][j, index] = v
        if reference:  # one threshold per group of 3 samples, over their padded batches
            for lo in range(0, len(ids), 3):
                rows = [(h[r], m[r]) for h, m, index in parts for r, i in enumerate(index)
                        if lo <= i < lo + 3]
                t = max(x.shape[0] for x, _ in rows)
                hs = torch.stack([torch.cat([x, x.new_zeros(t - x.shape[0], x.shape[1])])
                                  for x, _ in rows])
                ms = torch.stack([torch.cat([mm, mm.new_zeros(t - mm.shape[0])])
                                  for _, mm in rows])
                want["sparsity"][j, lo:lo + len(rows)] = M.sparsity_batch(
                    hs, ms, opts, groups=torch.zeros(len(rows), dtype=torch.long))
    cpu = capture(model, tok, cfg, 0)
    # a model too large to hold a batch at every state: each state goes to the workers at once
    monkeypatch.setattr(S, "CPU_STACK_BYTES", 0)
    by_state = {sch: capture(model, tok, replace(cfg, overlap=sch == "overlap"), 0)
                for sch in ("overlap", "inline")}
    _same(by_state["overlap"], by_state["inline"])
    monkeypatch.setattr(S, "_Reducer", _AcceleratorSchedule)
    acc = capture(model, tok, cfg, 0)
    for k, v in want.items():
        for got in (cpu, by_state["inline"], acc):
            torch.testing.assert_close(got.token[k], v, rtol=1e-10, atol=1e-12, equal_nan=True)
    if not reference:  # (padded positions count there: every sample has 40 rows)
        assert bool(cpu.token["curvature"][:, [2, 4]].isnan().all())
        assert bool(cpu.token["prompt_entropy"][:, 2].isnan().all())
    assert not bool(cpu.token["prompt_entropy"][:, 0].isnan().any())


def test_engine_batches_right_padded_in_the_given_order(tiny):
    _, tok, pad = tiny
    got = list(E.batches(tok, 3, pad, indices=[9, 2, 5, 0]))
    assert [b.index for b in got] == [[9, 2, 5], [0]]
    b = got[0]
    for r, i in enumerate(b.index):
        n = len(tok.input_ids[i])
        assert b.input_ids[r, :n].tolist() == tok.input_ids[i]
        assert bool(b.mask[r, :n].all()) and not bool(b.mask[r, n:].any())
        assert int(b.last_on(torch.device("cpu"))[r]) == n - 1
    h = torch.full((3, b.mask.shape[1], 2), float("nan"))
    h[b.mask] = 1.0
    mean, last = b.pool(h)
    assert torch.equal(mean, torch.ones(3, 2)) and torch.equal(last, torch.ones(3, 2))


def test_capture_matches_a_model_loaded_from_disk(model_dir, tokenizer):
    """The loaded model and the in-memory states agree (engine on a saved folder)."""
    model = load_model(str(model_dir("gpt2")))
    tok = D.tokenize([D.Sample(t) for t in TEXTS[:4]], tokenizer, 32)
    seen: dict[int, torch.Tensor] = {}

    class Keep:
        def start(self, batch):
            self.batch = batch

        def __call__(self, j, h):
            seen[j] = self.batch.pool(h)[0]

        def finish(self, batch):
            pass

    E.run_hooked(model, tok, 4, tokenizer.pad_token_id, Keep())
    res = capture(model, tok, CaptureConfig(batch_size=4, n_token=0), tokenizer.pad_token_id)
    for j, v in seen.items():
        assert torch.equal(res.pooled_mean[j], v)


def test_default_schedule_is_measured_and_recorded(tiny, monkeypatch):
    """On CPU the default keeps overlap where its background workers keep up on the first
    token batches, otherwise times both schedules there and keeps the faster (recorded with
    what decided it), and gives the inline numbers bit for bit, whichever it keeps."""
    model, tok, pad = tiny
    cfg = CaptureConfig(batch_size=1, n_token=8)
    inline = capture(model, tok, replace(cfg, overlap=False), pad)
    assert inline.info["token_metrics"] == "inline" and "schedule_probe" not in inline.info
    auto = capture(model, tok, cfg, pad)
    _same(inline, auto)
    probe = auto.info["schedule_probe"]
    assert probe["choice"] in ("inline", "overlap")
    # kept after the watch where the background workers kept up, else after the whole plan
    assert probe["steps"] == (S.ScheduleProbe.WATCH if probe["kept_by"] == "share"
                              else len(S.ScheduleProbe.PLAN))
    assert auto.info["token_metrics"] == probe["choice"]
    rates = probe["us_per_token"]
    if probe["kept_by"] == "share":
        assert probe["choice"] == "overlap"
        assert probe["watch_share"] >= S.ScheduleProbe.KEEP_SHARE
    elif probe["choice"] == "inline":  # kept only where clearly faster
        assert rates["inline"] < rates["overlap"] * (1 - S.ScheduleProbe.MARGIN)
    else:
        assert not rates["inline"] < rates["overlap"] * (1 - S.ScheduleProbe.MARGIN)
    # each way, whichever is faster is kept
    for slow in ("inline", "overlap"):
        p = S.ScheduleProbe()
        for step in p.PLAN:
            p.start(10)
            if step == slow:
                p._timing = (step, p._timing[1] - 1.0, 10)  # type: ignore[index]
            p.finish()
        assert p.choice == ("overlap" if slow == "inline" else "inline")
    few = capture(model, tok, replace(cfg, n_token=1), pad)  # too few token batches to decide
    assert few.info["token_metrics"] == "auto" and few.info["schedule_probe"]["choice"] is None
    _same(capture(model, tok, replace(cfg, n_token=1, overlap=False), pad), few)
