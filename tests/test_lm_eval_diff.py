"""Differential tests against lm-evaluation-harness's own code (skipped only when ``lm_eval``
cannot be imported; it is in the ``test`` extras).

- GSM8K scoring: a table of tricky completions goes through lm-eval's ``gsm8k`` task built from
  its own yaml (stop strings, ``strict-match`` / ``flexible-extract`` filter ensembles,
  ``exact_match`` with the yaml's options, gold from ``doc_to_target``) and through our
  ``rescore``; every item and filter must agree.
- GSM8K prompts: lm-eval's ``fewshot_context`` (seed 1234, train split and same-split pools)
  against ours.
- MMLU: lm-eval's ``mmlu`` yaml (5-shot ``first_n`` from the subject's dev split) prompts and
  requests, ``HFLM._encode_pair`` and ``HFLM.loglikelihood`` on a tiny local model with a
  legacy SentencePiece-style tokenizer (`` A`` alone is not `` A`` in context) against ours.
- ARC-Easy, ARC-Challenge, HellaSwag: lm-eval's own yamls (HellaSwag's ``process_docs``
  included) on tiny in-memory splits: few-shot prompts, requests, gold, ``acc`` and
  ``acc_norm`` of ``process_results`` on given log-likelihoods, and end to end on a tiny model
  (HFLM's log-likelihoods and lm-eval's scores against ``sftscope eval``'s).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

import yaml  # noqa: E402
from datasets import Dataset  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402

from sftscope.experiments import evaluate as E  # noqa: E402
from sftscope.load.items import load_task_items  # noqa: E402
from sftscope.tasks import gsm8k as G  # noqa: E402
from sftscope.tasks import mmlu as M  # noqa: E402
from sftscope.tasks.base import encode_pair  # noqa: E402

TASKS_DIR = Path(lm_eval.__file__).parent / "tasks"


def _lm_yaml(path: Path) -> dict:
    """A task yaml as lm-eval reads it (``!function`` tags resolved, includes merged)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path)


def _yaml(path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    inc = cfg.pop("include", None)
    if inc:
        base = _yaml(path.parent / inc)
        base.update(cfg)
        cfg = base
    return cfg


def _task(cfg: dict, splits: dict[str, list[dict]]) -> ConfigurableTask:
    """lm-eval's task from its yaml config, its dataset replaced by in-memory splits."""
    cfg = dict(cfg)
    cfg.pop("dataset_path", None)
    cfg.pop("dataset_name", None)
    cfg["custom_dataset"] = lambda **kw: {k: Dataset.from_list(v) for k, v in splits.items()}
    return ConfigurableTask(config=cfg)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------ GSM8K scoring

ANSWERS = ["He paid 3 * 6 = 18.\n#### 18", "So 1,000 + 80 = 1,080\n#### 1,080",
           "#### -3", "#### 0", "x\n#### 7.5", "#### 72", "no marker, just 18",
           "####  5", "#### 5\n", "#### $5", "a #### 4 b\n#### 9", "#### 072",
           "#### 18\x00", "#### 18.\x00\x00", "#### 18\u0130", "#### -0"]

COMPLETIONS = [
    # the strict format and its near misses
    " #### 18", " ####18", " ####  18", " #### $18", " #### 18.", " #### 18,", " #### -18",
    " #### --18", " #### 1 8", " #### 18#### 19", " ####\n18", " #### 1,080", " #### 1080",
    " #### 1.080", " #### 18.00", " #### 018", " #### -0", " #### 0", " #### 7.5",
    " #### 7.50", " #### .5", " #### 5.", " #### 5..", " #### ,5", " #### 5,", " #### 72",
    " #### 72.0", " #### 72.00", " #### 072", " #### -3", " #### - 3", " #### \u22123",
    " #### 9", " #### 4\n#### 9", "####", "#### ", " #### $5", " #### 5$",
    # flexible extraction
    " 72.0", " 72.00", " 2.50", " 072", " -0", " 72...", " $18.00", " $18", " 18$",
    " 1,080", " 1,080.", " 1,0,8,0", " -3", " - 3", " -3.", " 3-", " 18%", " 18 dollars",
    " eighteen", " 1e3", " 18/2", " 9 + 9 = 18", " 18 = 9 + 9", " 18. Then 19.",
    " Answer: 18", " The answer is: **18**", " \\boxed{18}", " 18\n", " 18\n\n",
    " 5.\n", " .", " ..", " ...", " $", " $$", " ,", " ,,", "", " ", " no number here",
    " 0.5", " .5", " 5", " 5 ", " 7.5.", " 7.5,", " -7.5", " $7.5", " (18)", " [18]",
    " 1 2 3", " 12 3", " 3 12", " 18 18", " 10 000", " 9,", " 9.", " 9..", " -", " --5",
    # stop strings inside the completion
    " 18\n\nQuestion: next?\nAnswer: 19", " 18</s>19", " 18<|im_end|>19",
    " #### 18</s>", " #### 1</s>8", " 1<|im_end|>8", " Question: 5", "</s>18", " 18 Question",
    " 18\nQuestion:\n#### 19", " #### 19\nQuestion: 18",
    # odd characters
    " #### 18\x00", " 18\x00", " \x00", " \u0130 18", " #### 18\r\n", " ＃＃＃＃ 18",
    " ١٨", " 18\u200b", " #### 1_8", " 18.\x00",
]


def _fuzz(n: int, seed: int = 0) -> list[str]:
    parts = ["####", "#### ", " ", "$", "-", ".", ",", "72", "0", "18", "5", "\n", "Question:",
             "</s>", "<|im_end|>", "x", "\u0130", "\x00", "..", "1,080", "Answer:"]
    rnd = random.Random(seed)
    return ["".join(rnd.choice(parts) for _ in range(rnd.randint(1, 8))) for _ in range(n)]


def _table() -> list[tuple[str, str]]:
    rows = []
    for i, c in enumerate(COMPLETIONS):
        rows.append((c, ANSWERS[i % len(ANSWERS)]))
        rows.append((c, ANSWERS[0]))
        # golds near the completion's own numbers, so that matches and near misses occur
        for x in {G.strict_filter(c), G.flexible_filter(c)} - {G.FALLBACK}:
            rows.append((c, f"so\n#### {x}"))
    fuzz = _fuzz(300)
    rows += [(c, ANSWERS[i % len(ANSWERS)]) for i, c in enumerate(fuzz)]
    rows += [(c, f"#### {G.flexible_filter(c)}") for c in fuzz[:100]]
    return rows


def _lm_eval_gsm8k(table: list[tuple[str, str]]) -> dict[str, list[bool]]:
    """Per filter (``strict-match``, ``flexible-extract``): lm-eval's exact_match per item."""
    from lm_eval.models.utils import postprocess_generated_text

    cfg = _yaml(TASKS_DIR / "gsm8k" / "gsm8k.yaml")
    cfg["num_fewshot"] = 0
    docs = [{"question": f"q{i}", "answer": a} for i, (_, a) in enumerate(table)]
    task = _task(cfg, {"train": docs[:2], "test": docs})
    task.build_all_requests(rank=0, world_size=1)
    until = list(cfg["generation_kwargs"]["until"])
    by_doc = {inst.doc_id: inst for inst in task.instances}
    for i, (raw, _) in enumerate(table):
        by_doc[i].resps.append(postprocess_generated_text(raw, stop=until,
                                                          think_end_token=None))
    task.apply_filters()
    out: dict[str, list[bool]] = {}
    for key in by_doc[0].filtered_resps:
        out[key] = [bool(task.process_results(docs[i], [by_doc[i].filtered_resps[key]])
                         ["exact_match"]) for i in range(len(table))]
    return out


def test_gsm8k_config_is_lm_evals():
    cfg = _yaml(TASKS_DIR / "gsm8k" / "gsm8k.yaml")
    assert tuple(cfg["generation_kwargs"]["until"]) == G.STOPS
    filters = {f["name"]: f["filter"] for f in cfg["filter_list"]}
    assert filters["strict-match"][0]["regex_pattern"] == G.STRICT_PATTERN
    assert filters["flexible-extract"][0]["regex_pattern"] == G.FLEXIBLE_PATTERN
    assert filters["flexible-extract"][0]["group_select"] == -1
    em = next(m for m in cfg["metric_list"] if m["metric"] == "exact_match")
    assert tuple(em["regexes_to_ignore"]) == G.IGNORE_PATTERNS
    assert em["ignore_case"] is True and em["ignore_punctuation"] is False
    assert cfg["num_fewshot"] == G.TASK.default_shots and cfg["fewshot_split"] == "train"


def test_gsm8k_scoring_agrees_with_lm_eval(tmp_path):
    table = _table()
    assert len(table) >= 100
    ref = _lm_eval_gsm8k(table)
    src = _jsonl(tmp_path / "completions.jsonl",
                 [{"completion": c, "answer": a} for c, a in table])
    res = E.rescore(E.EvalConfig(task="gsm8k", rescore=str(src), out=str(tmp_path / "run")))
    preds = [json.loads(x) for x in Path(res.predictions_path).read_text().splitlines()]
    assert len(preds) == len(table)
    bad = []
    for ours, theirs in (("strict_match", "strict-match"),
                         ("flexible_extract", "flexible-extract")):
        for i, (p, want) in enumerate(zip(preds, ref[theirs])):
            if p[ours] != want:
                bad.append((ours, table[i], p[ours], want))
    assert not bad, f"{len(bad)} disagreements with lm-eval, e.g. {bad[:5]}"
    # the table is not trivial: both outcomes occur for both filters
    for key in ref:
        assert 0 < sum(ref[key]) < len(table)
    k = sum(ref["flexible-extract"])
    assert res.score("flexible_extract").value == pytest.approx(k / len(table))


# ------------------------------------------------------------------ GSM8K prompts

def _gsm_docs(prefix: str, n: int) -> list[dict]:
    return [{"question": f"{prefix} {i}: Tom has {i} apples and buys {i % 3} more?",
             "answer": f"{i} + {i % 3} = {i + i % 3}\n#### {i + i % 3}"} for i in range(n)]


@pytest.mark.parametrize("same_split", [False, True])
def test_gsm8k_prompts_agree_with_lm_eval(tmp_path, same_split):
    train, test = _gsm_docs("train", 30), _gsm_docs("test", 8)
    cfg = _yaml(TASKS_DIR / "gsm8k" / "gsm8k.yaml")
    if same_split:
        cfg["fewshot_split"] = "test"
    task = _task(cfg, {"train": train, "test": test})
    task.set_fewshot_seed(1234)
    theirs = [task.fewshot_context(d, 5) for d in task.test_docs()]
    test_file = _jsonl(tmp_path / "test.jsonl", test)
    fewshot = None if same_split else str(_jsonl(tmp_path / "train.jsonl", train))
    items = load_task_items("gsm8k", str(test_file), shots=5, fewshot_data=fewshot)
    ours = [G.prompt(r, s) for r, s in zip(items.records, items.shots)]
    assert ours == theirs


# ------------------------------------------------------------------ MMLU

def legacy_sp_tokenizer():
    """A Llama-2-style legacy SentencePiece tokenizer: ``▁`` prepended to the text, spaces as
    ``▁``, pieces split before each ``▁``, BOS added. `` A`` alone is ``▁``, ``▁A``; after
    ``Answer:`` it is ``▁A``."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    texts = [M.prompt(r, ()) + f" {M.LETTERS[r['answer']]}" for r in _mmlu_docs("x", 12)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    alphabet = list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:?()\n_")
    tok.train_from_iterator(texts * 4, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=alphabet))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def _mmlu_docs(subject: str, n: int, start: int = 0) -> list[dict]:
    return [{"question": f"  Which number comes after {i}? ", "subject": subject,
             "choices": [str(i), str(i + 1), f"{i} and {i}", "none of these"],
             "answer": (i * 7) % 4} for i in range(start, start + n)]


@pytest.fixture(scope="module")
def mmlu_setup(tmp_path_factory):
    subject = "abstract_algebra"
    test = _mmlu_docs(subject, 6)
    dev = _mmlu_docs(subject, 7, start=100)
    others = _mmlu_docs("anatomy", 5, start=200)
    cfg = _yaml(TASKS_DIR / "mmlu" / "default" / f"mmlu_{subject}.yaml")
    assert cfg["fewshot_config"]["sampler"] == "first_n" and cfg["fewshot_split"] == "dev"
    cfg["num_fewshot"] = 5
    task = _task(cfg, {"test": test, "dev": dev})
    root = tmp_path_factory.mktemp("mmlu")
    mixed = others[:2] + dev[:3] + others[2:] + dev[3:]  # our pool: several subjects
    items = load_task_items("mmlu", str(_jsonl(root / "test.jsonl", test)), shots=5,
                            fewshot_data=str(_jsonl(root / "dev.jsonl", mixed)))
    return task, items, root


def test_mmlu_prompts_and_requests_agree_with_lm_eval(mmlu_setup):
    task, items, _ = mmlu_setup
    for doc, rec, shots in zip(task.test_docs(), items.records, items.shots):
        ctx = task.fewshot_context(doc, 5)
        assert M.prompt(rec, shots) == ctx
        assert [s["question"] for s in shots] == [d["question"] for d in
                                                   list(task.fewshot_docs())[:5]]
        reqs = task.construct_requests(doc, ctx)
        assert [r.arguments for r in reqs] == [(ctx, c) for c in M.continuations(rec)]
        assert task.doc_to_target(doc) == M.gold_index(rec)


@pytest.mark.slow
def test_mmlu_encoding_and_loglik_agree_with_hflm(mmlu_setup):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from sftscope.load.models import load_model
    from sftscope.load.tiny import save_tiny_model

    task, items, root = mmlu_setup
    tok = legacy_sp_tokenizer()
    folder = save_tiny_model(root / "model", "llama", tokenizer=tok, max_positions=1024)
    lm = HFLM(pretrained=str(folder), device="cpu", batch_size=4)
    contexts = [M.prompt(r, s) for r, s in zip(items.records, items.shots)]
    conts = [M.continuations(r) for r in items.records]
    alone = tok(" A", add_special_tokens=False)["input_ids"]
    differs = 0
    for ctx, cs in zip(contexts, conts):
        for c in cs:
            ours = encode_pair(tok, ctx, c)
            assert ours == tuple(lm._encode_pair(ctx, c))
            assert ours[0] == lm.tok_encode(ctx)
            differs += (c == " A" and ours[1] != alone)
    assert differs == len(contexts)  # the legacy tokenizer: in context is not alone
    # a context ending in whitespace: it moves to the continuation, as in lm-eval
    assert encode_pair(tok, contexts[0] + "\n", " B") == tuple(
        lm._encode_pair(contexts[0] + "\n", " B"))
    reqs = [Instance("loglikelihood", {}, (ctx, c), j) for ctx, cs in zip(contexts, conts)
            for j, c in enumerate(cs)]
    theirs = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    model = load_model(str(folder))
    ours = [v for row in E.choice_logprobs(model, tok, contexts, conts, batch_size=3)
            for v in row]
    assert ours == pytest.approx(theirs, abs=1e-4)
    # several-token continuations, and a context ending in whitespace (the other path)
    ctx2 = [contexts[0], contexts[1] + "\n"]
    conts2 = [[" none of these", " 1 and 1"], [" A", "B. two"]]
    assert any(len(encode_pair(tok, c, x)[1]) > 1 for c, xs in zip(ctx2, conts2) for x in xs)
    reqs = [Instance("loglikelihood", {}, (c, x), j) for c, xs in zip(ctx2, conts2)
            for j, x in enumerate(xs)]
    theirs = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    ours = [v for row in E.choice_logprobs(model, tok, ctx2, conts2, batch_size=2) for v in row]
    assert ours == pytest.approx(theirs, abs=1e-4)
    # a model with a short context: both left-truncate the same way (and we count it)
    short = save_tiny_model(root / "short", "llama", tokenizer=tok, max_positions=24)
    lm = HFLM(pretrained=str(short), device="cpu", batch_size=2)
    assert lm.max_length == 24
    model = load_model(str(short))
    for cs in (conts[:2], conts2):
        reqs = [Instance("loglikelihood", {}, (c, x), j) for c, xs in zip(ctx2, cs)
                for j, x in enumerate(xs)]
        theirs = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
        got, n_cut = E.choice_scores(model, tok, ctx2, cs, batch_size=2)
        assert [v for row in got for v in row] == pytest.approx(theirs, abs=1e-4)
        assert n_cut == 2


@pytest.mark.slow
def test_gsm8k_generation_agrees_with_hflm(model_dir, tmp_path):
    """Greedy completions of 5-shot prompts: HFLM.generate_until (the yaml's stop strings and
    EOS, 32 tokens) and our generate + stops give the same text on a tiny random model."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from sftscope.load.models import load_model, load_tokenizer

    folder = model_dir("llama")
    tok = load_tokenizer(str(folder))
    cfg = _yaml(TASKS_DIR / "gsm8k" / "gsm8k.yaml")
    task = _task(cfg, {"train": _gsm_docs("train", 12), "test": _gsm_docs("test", 4)})
    task.set_fewshot_seed(1234)
    prompts = [task.fewshot_context(d, 5) for d in task.test_docs()]
    gen_kwargs = {**cfg["generation_kwargs"], "max_gen_toks": 32}
    lm = HFLM(pretrained=str(folder), device="cpu", batch_size=1)
    theirs = lm.generate_until([Instance("generate_until", {}, (p, dict(gen_kwargs)), 0)
                                for p in prompts], disable_tqdm=True)
    model = load_model(str(folder))
    stops = G.STOPS + (E.eos_text(tok),)
    ours = E.generate(model, tok, prompts, max_new_tokens=32, batch_size=1, stops=stops)
    assert [g.completion for g in ours] == theirs
    assert any(g.new_tokens > 3 for g in ours)


# ------------------------------------------------------------------ ARC and HellaSwag

def _arc_docs(prefix: str, n: int) -> list[dict]:
    """ARC records: 3-5 choices, letter or digit labels (as in the real data)."""
    out = []
    for i in range(n):
        k = 3 + i % 3
        labels = list("ABCDE"[:k]) if i % 4 else [str(j + 1) for j in range(k)]
        texts = [f"{prefix} option {j} of {i}" + (" and more words" * (j % 2)) for j in range(k)]
        out.append({"id": f"{prefix}-{i}", "question": f"{prefix} question {i}: which one?",
                    "choices": {"text": texts, "label": labels},
                    "answerKey": labels[(i * 7) % k]})
    return out


def _hellaswag_docs(prefix: str, n: int) -> list[dict]:
    """HellaSwag records with WikiHow artefacts: `` [title]``, ``[header]``, double spaces."""
    return [{"ind": i, "activity_label": f"Cooking {prefix}", "source_id": f"s{i}",
             "ctx_a": f"A person opens the {prefix} box {i}. [header] Step one  here.",
             "ctx_b": "then they", "ctx": "unused", "split": "val", "split_type": "indomain",
             "endings": [f" close it [title] now {i}", "eat the box.",
                         f"walk  away {i} [step] fast", f"smile {i}"],
             "label": str(i % 4)} for i in range(n)]


CHOICE_TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", _arc_docs, "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", _arc_docs, "test"),
    "hellaswag": ("hellaswag/hellaswag.yaml", _hellaswag_docs, "validation"),
}


def _choice_setup(name: str, root: Path, n_test: int = 6):
    """lm-eval's task on tiny splits, and our items (2-shot from the same train pool)."""
    from sftscope.tasks import get_task

    path, docs, split = CHOICE_TASKS[name]
    train, test = docs("train", 12), docs("eval", n_test)
    cfg = _lm_yaml(TASKS_DIR / path)
    task = _task(cfg, {"train": train, split: test})
    task.set_fewshot_seed(1234)
    items = load_task_items(name, str(_jsonl(root / f"{name}-test.jsonl", test)), shots=2,
                            fewshot_data=str(_jsonl(root / f"{name}-train.jsonl", train)))
    return get_task(name), task, items, cfg


@pytest.mark.parametrize("name", sorted(CHOICE_TASKS))
def test_choice_task_prompts_requests_and_scores_agree_with_lm_eval(name, tmp_path):
    ours, task, items, cfg = _choice_setup(name, tmp_path)
    assert ours.hub.hub == cfg["dataset_path"] and ours.hub.config == cfg["dataset_name"]
    assert {m["metric"] for m in cfg["metric_list"]} == {"acc", "acc_norm"}
    assert ours.metrics == ("accuracy", "accuracy_norm") and ours.default_shots == 0
    rnd = random.Random(0)
    for doc, rec, shots in zip(task.eval_docs, items.records, items.shots, strict=True):
        ctx = task.fewshot_context(doc, 2)
        assert ours.prompt(rec, shots) == ctx
        reqs = task.construct_requests(doc, ctx)
        assert [r.arguments for r in reqs] == [(ctx, c) for c in ours.continuations(rec)]
        assert task.doc_to_target(doc) == ours.gold_index(rec)
        for _ in range(20):  # scoring: acc and acc_norm of the same log-likelihoods
            lls = [rnd.choice([-1.0, -2.0, -3.5, -7.0]) * rnd.random() for _ in reqs]
            theirs = task.process_results(doc, [(ll, False) for ll in lls])
            row = E._choice_row(ours, 0, rec, lls)
            assert (row["correct"], row["correct_norm"]) == \
                (bool(theirs["acc"]), bool(theirs["acc_norm"]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["arc_easy", "hellaswag"])
def test_choice_task_end_to_end_agrees_with_hflm(name, model_dir, tmp_path):
    """Our eval's accuracy and accuracy_norm equal lm-eval's acc and acc_norm from HFLM's
    log-likelihoods on a tiny model (0-shot, every item)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from sftscope.load.models import load_model, load_tokenizer

    _, task, items, _ = _choice_setup(name, tmp_path, n_test=8)
    folder = model_dir("llama")
    lm = HFLM(pretrained=str(folder), device="cpu", batch_size=4)
    acc, acc_norm = [], []
    for doc in task.eval_docs:
        ctx = task.fewshot_context(doc, 0)
        reqs = [Instance("loglikelihood", doc, r.arguments, j)
                for j, r in enumerate(task.construct_requests(doc, ctx))]
        res = task.process_results(doc, lm.loglikelihood(reqs, disable_tqdm=True))
        acc.append(res["acc"])
        acc_norm.append(res["acc_norm"])
    ours = E.evaluate_model(load_model(str(folder)), load_tokenizer(str(folder)),
                            E.EvalConfig(model=str(folder), task=name,
                                         data=str(tmp_path / f"{name}-test.jsonl"),
                                         batch_size=3))
    assert ours.score("accuracy").value == pytest.approx(sum(acc) / len(acc))
    assert ours.score("accuracy_norm").value == pytest.approx(sum(acc_norm) / len(acc_norm))
