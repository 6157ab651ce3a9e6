"""ARC-Easy as lm-evaluation-harness 0.4's ``arc_easy`` task (multiple choice).

``Question: {question}\\nAnswer:``, each of ``choices.text`` scored after a space, gold =
``choices.label.index(answerKey)``; ``accuracy`` (lm-eval ``acc``) and ``accuracy_norm``
(``acc_norm``); shots from the train split (lm-eval's default sampler, seed 1234), default 0.
"""

from __future__ import annotations

from sftscope.tasks.base import HubData, choice_task


def doc_to_text(doc: dict) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def doc_to_choice(doc: dict) -> list[str]:
    return [str(c) for c in doc["choices"]["text"]]


def doc_to_target(doc: dict) -> int:
    labels = [str(x) for x in doc["choices"]["label"]]
    if str(doc["answerKey"]) not in labels:
        raise ValueError(f"answerKey {doc['answerKey']!r} is not one of the choice labels "
                         f"{', '.join(labels)}")
    return labels.index(str(doc["answerKey"]))


def arc_task(name: str, config: str, what: str):
    """The ARC task of one dataset config (ARC-Easy, ARC-Challenge)."""
    return choice_task(
        name, summary=f"{what} grade-school science questions, log-likelihood of each answer "
                      f"text, as lm-eval's {name}",
        hub=HubData("allenai/ai2_arc", config, "test"),
        fields=("question", "choices", "answerKey"),
        doc_to_text=doc_to_text, doc_to_choice=doc_to_choice, doc_to_target=doc_to_target,
        labels=lambda doc: [str(x) for x in doc["choices"]["label"]],
        describe=lambda doc: {"question": doc.get("question"), "id": doc.get("id")})


TASK = arc_task("arc_easy", "ARC-Easy", "easy")
