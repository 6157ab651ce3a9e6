"""Every analysis command end to end on a dense pair and on each tiny mixture-of-experts
family (Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE, OLMoE): analyze, probe, swap,
steer, suggest through the CLI, then one report over their folders. A few samples each."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sftscope.cli import main
from sftscope.load.tiny import MOE_FAMILIES

pytestmark = pytest.mark.slow


def _run(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert int(e.value.code or 0) == 0, argv


def _commands(base: Path, sft: Path, data: str, out: Path) -> dict[str, list[str]]:
    common = ["--device", "cpu", "--max-length", "32"]
    cache = ["--cache-dir", str(out / "cache")]
    return {
        "analyze": ["analyze", "--base", str(base), "--sft", str(sft), "--data", data,
                    "--limit", "4", "--n-token", "2", "--batch-size", "2", "--bootstrap", "20",
                    *cache, *common],
        "probe": ["probe", "--base", str(base), "--sft", str(sft), "--data", data,
                  "--limit", "3", "--bootstrap", "0", *common],
        "swap": ["swap", "--base", str(base), "--sft", str(sft), "--data", data,
                 "--segments", "2", "--limit", "3", "--bootstrap", "0", *common],
        "steer": ["steer", "--base", str(base), "--sft", str(sft), "--data", data,
                  "--layer", "2", "--limit", "3", "--scales", "0,1", "--generate",
                  "--n-prompts", "2", "--max-new-tokens", "2", *common],
        "suggest": ["suggest", "--base", str(base), "--sft", str(sft), "--data", data,
                    "--segments", "2", "--method", "angular", "--limit", "3", *common],
    }


@pytest.mark.parametrize("family", ["llama", *MOE_FAMILIES])
def test_commands_end_to_end(model_dir, gsm8k_file, tmp_path, family):
    base, sft = model_dir(family, seed=0), model_dir(family, seed=1)
    data = f"gsm8k:{gsm8k_file}"
    runs = []
    for name, argv in _commands(base, sft, data, tmp_path).items():
        out = tmp_path / name
        _run([*argv, "--out", str(out)])
        assert (out / "run.json").is_file(), name
        assert json.loads((out / "run.json").read_text())["command"] == name
        runs.append(str(out))
    moe = family != "llama"
    routing = tmp_path / "analyze" / "routing.csv"
    assert routing.is_file() == moe
    if moe:
        df = pd.read_csv(routing)
        js = df[df.metric == "js_divergence"]
        assert len(js) == 4 and js.ci_low.notna().all()
        rec = json.loads((tmp_path / "analyze" / "run.json").read_text())
        assert rec["routing"]["top_k"] == 2 and rec["routing"]["n_experts"] == 4
    _run(["report", *runs, "--out", str(tmp_path / "report.html")])
    html = (tmp_path / "report.html").read_text()
    for fig in ("Fig. 1", "Fig. 3", "Fig. 6", "Fig. 8", "Fig. 11"):
        assert fig in html, fig
    assert ("Router JS divergence is largest" in html) == moe
