"""One progress display: stages, plain periodic lines in a log, rates and ETA, nesting."""

from __future__ import annotations

import re

import pytest

from sftscope import progress as P


@pytest.fixture()
def on(monkeypatch):
    """Progress on, stderr a log (not a terminal), a line after every item."""
    monkeypatch.delenv("SFTSCOPE_NO_PROGRESS", raising=False)
    monkeypatch.setenv("SFTSCOPE_PROGRESS_EVERY", "0")
    monkeypatch.setattr(P, "interactive", lambda: False)


def test_plain_lines_carry_stage_rates_and_eta(on, capsys):
    @P.staged
    def command() -> list[int]:
        P.plan(2)
        P.stage("capture base")
        got = list(P.track(range(4), "capture", tokens=lambda i: 10))
        P.stage("tables")
        return got

    assert command() == [0, 1, 2, 3]
    err = capsys.readouterr().err
    assert "[1/2 capture base]" in err and "[2/2 tables]" in err
    lines = [ln for ln in err.splitlines() if "capture: " in ln]
    assert lines and all(ln.startswith("sftscope: [1/2 capture base] capture: ") for ln in lines)
    assert "ETA" in lines[0] and "tokens/s" in lines[0] and "batches/s" in lines[0]
    assert lines[-1].split("capture: ")[1].startswith("4/4 batches (100 %)")
    assert "\r" not in err  # a log gets lines, not carriage returns


def test_staged_commands_nest_and_restore(on, capsys):
    @P.staged
    def inner() -> str:
        P.plan(1)
        P.stage("inner")
        return P.stage_label()

    @P.staged
    def outer() -> tuple[str, str, str]:
        P.plan(3)
        P.stage("first")
        got = inner()
        return P.stage_label(), got, P.stage_label("x")

    before = dict(P._STAGE)
    assert outer() == ("[1/3 first]", "[1/1 inner]", "[1/3 x]")
    assert before == P._STAGE  # nothing leaks out of a command


def test_stage_count_is_clamped_and_off_means_silent(monkeypatch, capsys):
    monkeypatch.setenv("SFTSCOPE_NO_PROGRESS", "1")
    with P.stages(1):
        P.stage("a")
        P.stage("b")  # one more than planned: stays at 1/1, no crash
        assert P.stage_label() == "[1/1 b]"
        assert list(P.track([1, 2], "x")) == [1, 2]
    assert capsys.readouterr().err == ""


def test_meter_eta_and_units():
    m = P.Meter("probe", total=10, unit="batches")
    m.t0 -= 2.0  # two seconds in
    m.update(4, tokens=400)
    line = m.line()
    assert re.search(r"4/10 batches \(40 %\), 2\.\d\d batches/s, 2\d\d tokens/s", line), line
    assert "ETA 0:03" in line


def test_analyze_announces_its_stages(on, model_dir, gsm8k_file, tmp_path, capsys):
    """A real command: every stage announced in order, bars labelled with their stage."""
    from sftscope.config.commands import AnalyzeConfig
    from sftscope.experiments.analyze import analyze

    base, sft = model_dir("llama", seed=0), model_dir("llama", seed=1)
    analyze(AnalyzeConfig(base=str(base), sft=str(sft), data=f"gsm8k:{gsm8k_file}", limit=4,
                          n_token=2, max_length=32, bootstrap=0, out=str(tmp_path / "a"),
                          cache_dir=str(tmp_path / "cache")))
    err = capsys.readouterr().err
    stages = re.findall(r"^\[(\d)/(\d) ([^\]]+)\]$", err, flags=re.M)
    assert stages == [("1", "3", "capture base"), ("2", "3", "capture sft"),
                      ("3", "3", "metrics and tables")], err
    bars = [ln for ln in err.splitlines() if ln.startswith("sftscope: [")]
    assert bars and any(ln.startswith("sftscope: [1/3 capture base]") for ln in bars), err
    assert P._STAGE["n"] == 0
