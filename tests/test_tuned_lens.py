"""The tuned lens: identity at initialisation, training lowers the KL to the output at early
layers against the logit lens, translators saved, keyed by content and options, and reused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sftscope.cli import main
from sftscope.errors import SftscopeError
from sftscope.experiments.lens import probe
from sftscope.experiments.tuned_lens import Translators, load_translators


def test_translators_start_as_the_identity():
    tr = Translators(3, 8)
    h = torch.randn(5, 8)
    for j in range(4):  # j = 3 = L: no translator, the state itself
        torch.testing.assert_close(tr(j, h), h, rtol=0, atol=0)


@pytest.fixture(scope="module")
def long_file(tmp_path_factory):
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples now?",
             "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"}
            for a in range(1, 9) for b in range(1, 6)]
    p = tmp_path_factory.mktemp("lens") / "g.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _kl(df, model):
    sel = df[(df.model == model) & (df.metric == "kl_to_final")].sort_values("layer")
    return sel.value.to_numpy()


def test_tuned_lens_beats_the_logit_lens_early_and_is_reused(model_dir, long_file, tmp_path):
    path = str(model_dir("llama", seed=0))
    kw = dict(model=path, data=f"gsm8k:{long_file}", n=8, max_length=64, n_boot=20,
              lens="tuned", lens_steps=60, lens_lr=1e-2, lens_train_limit=24,
              translators=str(tmp_path / "tr"), out=str(tmp_path / "run"))
    df = probe(**kw)
    name = model_dir("llama", seed=0).name
    logit, tuned = _kl(df, name), _kl(df, f"{name} (tuned lens)")
    assert len(logit) == len(tuned) == 5 and logit[-1] == tuned[-1] == 0.0
    assert tuned[:2].mean() < 0.8 * logit[:2].mean()  # the early layers read far better
    assert {"accuracy", "loss"} <= set(df[df.model == f"{name} (tuned lens)"].metric)
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    info = rec["tuned_lens"][name]
    assert info["trained"] and info["loss_last"] < info["loss_first"]
    saved = list((tmp_path / "tr").glob("*.safetensors"))
    assert len(saved) == 1 and info["key"] in saved[0].name
    again = probe(**{**kw, "out": str(tmp_path / "run2")})
    rec2 = json.loads((tmp_path / "run2" / "run.json").read_text())
    assert rec2["tuned_lens"][name]["trained"] is False
    np.testing.assert_array_equal(_kl(again, f"{name} (tuned lens)"), tuned)
    other = probe(**{**kw, "lens_steps": 5, "out": str(tmp_path / "run3")})  # other options
    assert len(list((tmp_path / "tr").glob("*.safetensors"))) == 2
    assert json.loads((tmp_path / "run3" / "run.json").read_text())["tuned_lens"][name][
        "trained"]
    assert len(other)


def test_bad_translators_and_options(model_dir, long_file, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SftscopeError, match="could not be read"):
        load_translators(bad, 4, 32)
    path = str(model_dir("llama", seed=0))
    for extra, needle in ((["--translators", str(tmp_path)], "add --lens tuned"),
                          (["--lens", "tuned", "--lens-steps", "0"], "at least 1"),
                          (["--lens", "fancy"], "unknown --lens")):
        with pytest.raises(SystemExit) as e:
            main(["probe", "--model", path, "--data", f"gsm8k:{long_file}", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and needle in err[0], err
    with pytest.raises(SftscopeError, match="every text of"):
        probe(model=path, data=f"gsm8k:{long_file}", lens="tuned", lens_steps=1, n=40)


def test_report_compares_the_lenses_early():
    import pandas as pd

    from sftscope.report import numbers as N
    from sftscope.report.sections import distribution_findings

    rows = []
    for j, (a, b) in enumerate([(0.8, 0.2), (0.6, 0.1), (0.4, 0.1), (0.2, 0.05), (0.0, 0.0)]):
        rows += [{"layer": j, "model": "m", "metric": "kl_to_final", "value": a},
                 {"layer": j, "model": "m (tuned lens)", "metric": "kl_to_final", "value": b}]
    lines = distribution_findings(N.distribution_data(pd.DataFrame(rows)))
    assert lines == ["m: over the early states (j / L <= 0.5, 3 states) the tuned lens's mean KL "
                     "to the output is 0.133 nats against the logit lens's 0.600 (0.22x)."]
