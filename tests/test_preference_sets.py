"""Registered hub preference sets (``preference:hh-rlhf``, ``preference:ultrafeedback``,
``preference:orca-dpo``): their rows become prompt/chosen/rejected records, a row that cannot be
split is refused with its record number (or skipped), and without a hub one line says how to
use a local file instead. Small local rows stand in for the hub (``datasets.load_dataset``
replaced), so nothing here needs a network."""

from __future__ import annotations

import json

import pytest

from sftscope.errors import SftscopeError
from sftscope.load.data import SETS, load_records, read_samples

H, A = "\n\nHuman:", "\n\nAssistant:"

HH = [  # two turns, the second reply differs; one turn, differing from its first word
    {"chosen": f"{H} Hi{A} Hello!{H} What is 2+2?{A} 4.",
     "rejected": f"{H} Hi{A} Hello!{H} What is 2+2?{A} 5, I think."},
    {"chosen": f"{H} Name a colour.{A} Blue.", "rejected": f"{H} Name a colour.{A} Bread."},
    {"chosen": "no dialogue here", "rejected": "nor here"},
]


def _msgs(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


ULTRA = [{"prompt": "Say hi", "prompt_id": "x", "score_chosen": 8.0, "score_rejected": 2.0,
          "chosen": _msgs(("user", "Say hi"), ("assistant", "Hi!")),
          "rejected": _msgs(("user", "Say hi"), ("assistant", "No."))}]

ORCA = [{"system": "You are terse.", "input": "2+2?", "chosen": "4", "rejected": "5",
         "status": "unchanged"},
        {"system": "", "input": "3+3?", "chosen": "6", "rejected": "7", "status": "tie"}]

ROWS = {("Anthropic/hh-rlhf", "train"): HH, ("Anthropic/hh-rlhf", "test"): HH[:2],
        ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"): ULTRA,
        ("HuggingFaceH4/ultrafeedback_binarized", "test_prefs"): ULTRA,
        ("argilla/distilabel-intel-orca-dpo-pairs", "train"): ORCA}


@pytest.fixture()
def hub(monkeypatch):
    """``datasets.load_dataset`` serving ``ROWS``; the calls it got."""
    import datasets

    calls: list[tuple] = []

    def load_dataset(path, name=None, split=None, revision=None, **kw):
        calls.append((path, name, split, revision))
        return [dict(r) for r in ROWS[(path, split)]]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_every_set_is_declared_once_in_the_preference_format():
    from sftscope.load.data import dataset_names
    from sftscope.tasks import preference

    assert set(SETS["preference"]) == {"hh-rlhf", "ultrafeedback", "orca-dpo"}
    for name, spec in SETS["preference"].items():
        assert spec.hub and spec.convert is not None and spec.fields == preference.FIELDS
        assert f"preference:{name}" in dataset_names()


def test_hh_rlhf_splits_the_shared_dialogue_off_as_the_prompt(hub):
    with pytest.raises(SftscopeError, match=r"Anthropic/hh-rlhf \(train split\), record 3: "
                                            r"chosen and rejected share no dialogue"):
        load_records("preference:hh-rlhf")
    recs = load_records("preference:hh-rlhf", skip_bad=True)
    assert recs.records[0] == {"prompt": f"{H} Hi{A} Hello!{H} What is 2+2?{A}",
                               "chosen": " 4.", "rejected": " 5, I think."}
    assert recs.records[1] == {"prompt": f"{H} Name a colour.{A}", "chosen": " Blue.",
                               "rejected": " Bread."}
    assert len(recs.skipped) == 1 and "record 3" in recs.skipped[0]
    samples, notes = read_samples("preference:hh-rlhf", skip_bad=True, shuffle=False)
    assert [s.answer for s in samples] == [" 4.", " Blue."]
    assert "1 of 3 records were skipped" in notes[0]
    assert samples[1].text == f"{H} Name a colour.{A} Blue."
    assert hub[0] == ("Anthropic/hh-rlhf", None, "train", None)
    load_records("preference:hh-rlhf", "test")
    assert hub[-1][2] == "test"
    recs = load_records("preference:hh-rlhf@abc123", "test")
    assert hub[-1] == ("Anthropic/hh-rlhf", None, "test", "abc123")
    assert recs.where[0] == "Anthropic/hh-rlhf@abc123 (test split), record 1"
    with pytest.raises(SftscopeError, match="name a hub revision after '@'"):
        load_records("preference:hh-rlhf@")


def test_ultrafeedback_messages_and_its_split_names(hub):
    recs = load_records("preference:ultrafeedback")
    assert recs.records == [{"prompt": _msgs(("user", "Say hi")),
                             "chosen": _msgs(("assistant", "Hi!")),
                             "rejected": _msgs(("assistant", "No."))}]
    assert recs.where == ["HuggingFaceH4/ultrafeedback_binarized (train_prefs split), record 1"]
    load_records("preference:ultrafeedback", "test")
    assert [c[2] for c in hub] == ["train_prefs", "test_prefs"]
    s = read_samples("preference:ultrafeedback")[0][0]
    assert s.meta["pair"] == recs.records[0] and s.prompt == "Say hi" and s.answer == "Hi!"
    same = dict(ULTRA[0], rejected=_msgs(("assistant", "Say hi"), ("assistant", "No.")))
    ROWS[("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")] = [same]
    try:
        with pytest.raises(SftscopeError, match="record 1: chosen and rejected share no turn"):
            load_records("preference:ultrafeedback")
    finally:
        ROWS[("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")] = ULTRA


def test_orca_prompt_is_system_then_input(hub):
    recs = load_records("preference:orca-dpo")
    assert recs.records == [{"prompt": "You are terse.\n\n2+2?", "chosen": "4", "rejected": "5"},
                            {"prompt": "3+3?", "chosen": "6", "rejected": "7"}]


def test_a_hub_set_evaluates_as_the_preference_task(hub):
    from sftscope.load.items import load_task_items

    items = load_task_items("preference", "preference:hh-rlhf", split="test")
    assert [r["chosen"] for r in items.records] == [" 4.", " Blue."]


def test_offline_is_one_line_naming_the_set_and_the_local_file(monkeypatch, model_dir,
                                                               tmp_path, capsys):
    pytest.importorskip("trl")
    import datasets

    from sftscope.cli import main

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    model = model_dir("llama", n_layers=4)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["tune", "--model", str(model), "--train",
              "preference:hh-rlhf", "--out", str(tmp_path / "o"), "--mask", "01",
              "--objective", "dpo", "--no-eval"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert len(err) == 1, err
    assert "could not load preference:hh-rlhf (Anthropic/hh-rlhf) from the hub" in err[0]
    assert "as preference:FILE" in err[0] and "prompt, chosen, rejected" in err[0]


def test_the_format_alone_names_the_sets():
    with pytest.raises(SftscopeError, match=r"local-only format: give its file as "
                                            r"preference:FILE .* or a registered hub set "
                                            r"\(preference:hh-rlhf, preference:ultrafeedback"):
        load_records("preference")


def test_dpo_rows_of_a_hub_set(hub, model_dir, tmp_path):
    """What TRL gets: the converted pairs as given (texts, or messages with a chat template)."""
    pytest.importorskip("trl")
    from sftscope.experiments import objectives as OB
    from sftscope.experiments.tune import TuneConfig

    cfg = TuneConfig(model=str(model_dir("llama", n_layers=4)), train="preference:hh-rlhf",
                     out=str(tmp_path / "o"), mask="01", objective="dpo", run_eval=False,
                     skip_bad_records=True, n_train=None)
    rows, notes = OB.train_rows(cfg)
    assert sorted(json.dumps(r, sort_keys=True) for r in rows) == sorted(
        json.dumps(r, sort_keys=True) for r in load_records("preference:hh-rlhf",
                                                            skip_bad=True).records)
    assert "1 of 3 records were skipped" in notes[0]
