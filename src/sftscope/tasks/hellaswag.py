"""HellaSwag as lm-evaluation-harness 0.4's ``hellaswag`` task (multiple choice).

Each record is processed as lm-eval's ``process_docs``: query = ``activity_label: ctx_a
Ctx_b`` and the four endings, cleaned of WikiHow's bracket artefacts; each ending is scored
after a space; gold = ``label``. Evaluated on the validation split (the test labels are
hidden); ``accuracy`` and ``accuracy_norm``; shots from the train split, default 0, drawn
as lm-eval draws them for a config without a test split (``n + 1`` per item, the item
dropped).
"""

from __future__ import annotations

import re

from sftscope.tasks.base import HubData, choice_task


def preprocess(text: str) -> str:
    """lm-eval's ``preprocess``: strip, `` [title]`` -> ``. ``, drop ``[...]``, collapse
    double spaces once."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def process(doc: dict) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"query": preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])}


TASK = choice_task(
    "hellaswag", summary="commonsense sentence endings, log-likelihood of each ending, as "
                         "lm-eval's hellaswag",
    hub=HubData("Rowan/hellaswag", None, "validation"),
    fields=("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    process=process, doc_to_text=lambda d: d["query"], doc_to_choice=lambda d: d["choices"],
    doc_to_target=lambda d: d["gold"], shots_skip_item=True,  # no test split in lm-eval
    describe=lambda doc: {"activity_label": doc.get("activity_label"), "ind": doc.get("ind")})
