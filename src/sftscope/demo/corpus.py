"""A generated corpus for the demo pair: pre-training text, an SFT set, GSM8K-like splits.

Everything is drawn from templates with ``random.Random`` seeded by strings, so a seed gives the
same corpus on every machine and Python version. The problems are small (one- or two-digit
numbers, one or two steps) so a tiny model can learn some of them on a CPU in minutes.

Splits (what each is for):

- ``pretrain``: plain text documents for the BASE model: prose, arithmetic drills
  (``12 + 5 = 17``), arithmetic in words, word problems written as running text with their
  worked solution, and ``Question: ...\\nAnswer: 7`` text (short answers, no ``####``). The base
  so sees the questions and the arithmetic, but never the ``#### N`` answer format.
- ``sft``: ``{"question", "answer"}`` records; ``answer`` is a worked solution ending in
  ``\\n#### N`` exactly like GSM8K. Fine-tuning on it makes the SFT model.
- ``gsm8k_train``: more such records, disjoint from ``sft`` (LoRA tuning, few-shot examples).
- ``gsm8k_test``: held-out records. Their questions appear nowhere else, and no addition or
  subtraction they need (``a + b``, ``a - b``) appears anywhere in the training text, so getting
  one right takes arithmetic, not recall. (Times tables and halves are facts, not held out.)
- ``general``: ``{"text"}`` prose records drawn apart from the pre-training text, to measure
  what fine-tuning costs the model on ordinary text (retention).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftscope.errors import SftscopeError
from sftscope.io import write_text

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
"""The prompt format of the SFT set (and of the demo's evaluation); the completion follows
after one space and ends with the tokenizer's end-of-sequence token."""

FILES = {
    "pretrain": "pretrain.jsonl",
    "sft": "sft.jsonl",
    "gsm8k_train": "gsm8k_train.jsonl",
    "gsm8k_test": "gsm8k_test.jsonl",
    "general": "general.jsonl",
}

_NAMES = [
    ("Tom", "he"), ("Mia", "she"), ("Sam", "he"), ("Ana", "she"), ("Leo", "he"), ("Eva", "she"),
    ("Ben", "he"), ("Zoe", "she"), ("Max", "he"), ("Lily", "she"), ("Omar", "he"),
    ("Nina", "she"), ("Ravi", "he"), ("Iris", "she"), ("Jack", "he"), ("Emma", "she"),
    ("Noah", "he"), ("Ella", "she"), ("Finn", "he"), ("Rosa", "she"), ("Hugo", "he"),
    ("Maya", "she"), ("Ivan", "he"), ("Lena", "she"),
]
_ITEMS = [
    "apples", "pencils", "marbles", "stickers", "cookies", "books", "cards", "shells", "coins",
    "flowers", "eggs", "stamps", "balloons", "candies", "buttons", "oranges", "crayons", "beads",
]
_CONTAINERS = ["bag", "box", "pack", "jar", "basket", "bowl"]
_PLURAL = {"box": "boxes"}
_PLACES = [
    "the park", "the market", "the library", "the school", "the farm", "the river", "the beach",
    "the garden", "the station", "the bakery", "the museum", "the forest", "the lake",
    "the zoo", "the city", "the village",
]
_ACTIVITIES = [
    "read books", "play chess", "ride a bike", "draw pictures", "bake bread", "plant flowers",
    "sing songs", "feed the ducks", "fly a kite", "write letters", "play the piano", "go fishing",
    "paint the fence", "walk the dog", "build sand castles", "watch the birds",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_TIMES = ["in the morning", "after lunch", "in the evening", "at night", "after school",
          "on weekends"]
_ADJ = ["small", "big", "old", "young", "quiet", "happy", "tired", "clever", "brave", "lazy"]
_ANIMALS = ["cat", "dog", "bird", "horse", "rabbit", "fox", "duck", "goat", "mouse", "cow"]
_ANIMAL_VERBS = ["sat", "slept", "ran", "played", "waited", "hid", "jumped", "rested"]
_PREPS = ["under", "near", "behind", "beside", "on", "by"]
_OBJECTS = ["table", "tree", "door", "fence", "bridge", "window", "wall", "chair", "bench"]
_WEATHER = ["sunny", "rainy", "cold", "warm", "windy", "cloudy", "bright", "grey"]
_FEELINGS = ["happy", "proud", "tired", "surprised", "calm", "excited"]
_FACTS = [
    "A week has 7 days.", "A year has 12 months.", "An hour has 60 minutes.",
    "A day has 24 hours.", "A dozen is 12.", "A triangle has 3 sides.", "A square has 4 sides.",
    "A spider has 8 legs.", "A dog has 4 legs.", "A bird has 2 wings.",
    "Water freezes at 0 degrees.",
    "A minute has 60 seconds.", "A hand has 5 fingers.", "A pair is 2.", "A century is 100 years.",
    "The sun rises in the east.", "The sun sets in the west.", "Fish live in water.",
    "Bees make honey.", "Cows give milk.", "Plants need water and light to grow.",
    "Ice is frozen water.", "The moon goes around the earth.",
]

Key = tuple[str, int, int]


@dataclass
class Corpus:
    """All splits of the generated corpus (see the module docstring for what each is for)."""

    seed: int
    pretrain: list[str] = field(default_factory=list)
    sft: list[dict[str, str]] = field(default_factory=list)
    gsm8k_train: list[dict[str, str]] = field(default_factory=list)
    gsm8k_test: list[dict[str, str]] = field(default_factory=list)
    general: list[dict[str, str]] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        """Records per split."""
        return {name: len(getattr(self, name)) for name in FILES}


@dataclass(frozen=True)
class Problem:
    """One word problem: question, worked solution lines, result, the computations it uses."""

    question: str
    steps: tuple[str, ...]
    result: int
    keys: tuple[Key, ...]

    def record(self) -> dict[str, str]:
        """GSM8K fields: ``answer`` is the worked solution ending in ``#### N``."""
        return {"question": self.question, "answer": gsm8k_answer(self.steps, self.result)}


def gsm8k_answer(steps: tuple[str, ...] | list[str], result: int) -> str:
    """The GSM8K answer layout: solution lines, then ``#### N`` on the last line."""
    return "\n".join(steps) + f"\n#### {result}"


def format_prompt(question: str) -> str:
    """The demo's prompt for a question (``Question: ...\\nAnswer:``)."""
    return PROMPT_TEMPLATE.format(question=question)


# ----------------------------------------------------------------------------- generators

HELD_OUT_OPS = ("+", "-")
"""Operations whose exact computations in the test split are kept out of all training text."""

DOC_MIX = {"prose": 0.20, "drill": 0.30, "words": 0.10, "story": 0.22, "qa": 0.18}
"""Shares of the pre-training document kinds (arithmetic-heavy: a tiny model needs many
examples to learn two-digit addition and subtraction)."""

PROBLEM_MIX = {"add": 0.28, "sub": 0.24, "mul": 0.14, "half": 0.10, "add_sub": 0.14,
               "mul_add": 0.10}
"""Shares of the word-problem kinds (one step: add, sub, mul, half; two steps: the rest)."""


_ONE_STEP = {
    "+": (("{n} has {a} {it}. {P} buys {b} more {it}. How many {it} does {n} have now?",
           "{n} has {a} + {b} = {c} {it} now."),
          ("{n} picked {a} {it} in the morning and {b} {it} in the afternoon. "
           "How many {it} did {n} pick in all?",
           "{n} picked {a} + {b} = {c} {it} in all.")),
    "-": (("{n} had {a} {it}. {P} gave {b} {it} to {m}. How many {it} does {n} have left?",
           "{n} has {a} - {b} = {c} {it} left."),
          ("There are {a} {it} in a {box}. {n} takes out {b} of them. "
           "How many {it} are still in the {box}?",
           "There are {a} - {b} = {c} {it} still in the {box}.")),
}
"""The two phrasings (question, solution line) of each one-step word problem."""


_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mul": ("{n} buys {a} {boxes} of {it}. Each {box} has {b} {it}. How many {it} does {n} buy?",
            ("{n} buys {a} * {b} = {c} {it}.",)),
    "half": ("{n} has {a} {it} and gives half of them to {m}. How many {it} does {n} give to "
             "{m}?",
             ("{n} gives {a} / 2 = {c} {it} to {m}.",)),
    "add_sub": ("{n} has {a} {it}. {P} buys {b} more {it} and then gives {d} {it} to {m}. How "
                "many {it} does {n} have now?",
                ("After buying, {n} has {a} + {b} = {s1} {it}.",
                 "After giving some away, {n} has {s1} - {d} = {c} {it}.")),
    "mul_add": ("{n} already has {d} {it}. {P} buys {a} {boxes} with {b} {it} in each. How many "
                "{it} does {n} have now?",
                ("{n} buys {a} * {b} = {s1} {it}.", "Now {n} has {d} + {s1} = {c} {it}.")),
}
"""The question and solution lines of each multi-step or fixed-phrasing word problem."""


def _written(kind: str, answer: int, keys: tuple[Key, ...], **fields: Any) -> Problem:
    """The problem ``kind`` of ``_TEMPLATES`` with its drawn ``fields`` filled in (``P``: the
    pronoun ``p`` capitalised, ``boxes``: the plural of ``box``, ``c``: the answer)."""
    fields["c"] = answer
    if "p" in fields:
        fields["P"] = fields["p"].capitalize()
    if "box" in fields:
        fields["boxes"] = _PLURAL.get(fields["box"], fields["box"] + "s")
    q, steps = _TEMPLATES[kind]
    return Problem(q.format(**fields), tuple(s.format(**fields) for s in steps), answer, keys)


class _Writer:
    """Draws problems and text from one random stream, numbers in ``1..top``, and never writes
    an addition or subtraction in ``held_out``."""

    def __init__(self, rng: random.Random, top: int, held_out: set[Key] | None = None) -> None:
        self.rng, self.top, self.held_out = rng, top, held_out or set()

    # numbers ---------------------------------------------------------------------------
    def add_pair(self, top: int | None = None) -> tuple[int, int]:
        top = top or self.top
        while True:
            a, b = self.rng.randint(2, top - 2), self.rng.randint(2, top - 2)
            if a + b <= top:
                return a, b

    def sub_pair(self) -> tuple[int, int]:
        a = self.rng.randint(5, self.top)
        return a, self.rng.randint(1, a - 1)

    def mul_pair(self, top: int | None = None) -> tuple[int, int]:
        top = top or self.top
        while True:
            a, b = self.rng.randint(2, 9), self.rng.randint(2, 9)
            if a * b <= top:
                return a, b

    def who(self) -> tuple[str, str, str]:
        (name, pron), (other, _) = self.rng.sample(_NAMES, 2)
        return name, pron, other

    # problems --------------------------------------------------------------------------
    def p_add(self) -> Problem:
        return self._one_step("+", self.add_pair)

    def p_sub(self) -> Problem:
        return self._one_step("-", self.sub_pair)

    def _one_step(self, op: str, draw: Callable[[], tuple[int, int]]) -> Problem:
        """A one-step addition or subtraction in one of two phrasings (``_ONE_STEP``).

        Draws in a fixed order (names, item, numbers, phrasing, container only where the
        phrasing has one), so one seed always writes the same problems.
        """
        rng = self.rng
        n, p, m = self.who()
        it = rng.choice(_ITEMS)
        a, b = draw()
        c = a + b if op == "+" else a - b
        q, s = _ONE_STEP[op][0 if rng.random() < 0.5 else 1]
        box = rng.choice(_CONTAINERS) if "{box}" in q else ""
        fields = {"n": n, "P": p.capitalize(), "m": m, "it": it, "a": a, "b": b, "c": c,
                  "box": box}
        return Problem(q.format(**fields), (s.format(**fields),), c, ((op, a, b),))

    def p_mul(self) -> Problem:
        rng = self.rng
        n, _, _ = self.who()
        it, box = rng.choice(_ITEMS), rng.choice(_CONTAINERS)
        a, b = self.mul_pair()
        return _written("mul", a * b, (("*", a, b),), n=n, it=it, box=box, a=a, b=b)

    def p_half(self) -> Problem:
        n, _, m = self.who()
        it = self.rng.choice(_ITEMS)
        a = 2 * self.rng.randint(1, self.top // 2)
        return _written("half", a // 2, (("/", a, 2),), n=n, m=m, it=it, a=a)

    def p_add_sub(self) -> Problem:
        n, p, m = self.who()
        it = self.rng.choice(_ITEMS)
        a, b = self.add_pair()
        s1 = a + b
        d = self.rng.randint(1, s1 - 1)
        return _written("add_sub", s1 - d, (("+", a, b), ("-", s1, d)),
                        n=n, p=p, m=m, it=it, a=a, b=b, s1=s1, d=d)

    def p_mul_add(self) -> Problem:
        rng = self.rng
        n, p, _ = self.who()
        it, box = rng.choice(_ITEMS), rng.choice(_CONTAINERS)
        a, b = self.mul_pair(self.top - 2)
        s1 = a * b
        d = rng.randint(1, self.top - s1)
        return _written("mul_add", s1 + d, (("*", a, b), ("+", d, s1)),
                        n=n, p=p, it=it, box=box, a=a, b=b, s1=s1, d=d)

    def problem(self) -> Problem:
        """One word problem of a random kind, none using a held-out computation."""
        kinds, weights = zip(*PROBLEM_MIX.items())
        while True:
            pr = getattr(self, f"p_{self.rng.choices(kinds, weights=weights)[0]}")()
            if not any(k in self.held_out for k in pr.keys):
                return pr

    def problems(self, n: int, seen: set[str]) -> list[Problem]:
        """``n`` problems whose questions are not in ``seen`` (which they are added to)."""
        out: list[Problem] = []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise SftscopeError(f"could not draw {n} distinct problems; ask for fewer")
            pr = self.problem()
            if pr.question not in seen:
                seen.add(pr.question)
                out.append(pr)
        return out

    # text ------------------------------------------------------------------------------
    def sentence(self) -> str:
        rng = self.rng
        n, p, m = self.who()
        kind = rng.randrange(11)
        if kind == 0:
            return f"{n} lives near {rng.choice(_PLACES)}."
        if kind == 1:
            return f"On {rng.choice(_DAYS)}, {n} went to {rng.choice(_PLACES)} with {m}."
        if kind == 2:
            return f"{p.capitalize()} likes to {rng.choice(_ACTIVITIES)} {rng.choice(_TIMES)}."
        if kind == 3:
            return f"{n} and {m} are friends, and they often {rng.choice(_ACTIVITIES)} together."
        if kind == 4:
            return (f"The {rng.choice(_ADJ)} {rng.choice(_ANIMALS)} "
                    f"{rng.choice(_ANIMAL_VERBS)} {rng.choice(_PREPS)} the "
                    f"{rng.choice(_OBJECTS)}.")
        if kind == 5:
            return (f"It was a {rng.choice(_WEATHER)} day, so {n} decided to "
                    f"{rng.choice(_ACTIVITIES)}.")
        if kind == 6:
            return f"At {rng.choice(_PLACES)}, {n} saw {rng.randint(2, 20)} {rng.choice(_ITEMS)}."
        if kind == 7:
            return f"{n} felt {rng.choice(_FEELINGS)} when {m} came home {rng.choice(_TIMES)}."
        if kind == 8:
            return rng.choice(_FACTS)
        if kind == 9:
            poss = "his" if p == "he" else "her"
            day, place = rng.choice(_DAYS), rng.choice(_PLACES)
            return f"Every {day}, {n} and {poss} friend {m} walk to {place}."
        return (f"{m} told {n} that {rng.choice(_PLACES)} is {rng.choice(_ADJ)} "
                f"{rng.choice(_TIMES)}.")

    def prose(self, n_sentences: tuple[int, int] = (4, 8)) -> str:
        """A paragraph of plain template prose."""
        return " ".join(self.sentence() for _ in range(self.rng.randint(*n_sentences)))

    def equation(self) -> tuple[str, int, int, int]:
        rng = self.rng
        while True:
            r = rng.random()
            if r < 0.4:
                a, b = self.add_pair()
                op, c = "+", a + b
            elif r < 0.75:
                a, b = self.sub_pair()
                op, c = "-", a - b
            elif r < 0.9:
                a, b = self.mul_pair()
                op, c = "*", a * b
            else:
                a, b = 2 * rng.randint(1, self.top // 2), 2
                op, c = "/", a // 2
            if (op, a, b) not in self.held_out:
                return op, a, b, c

    def doc_drill(self) -> str:
        """Arithmetic drill lines: ``41 + 6 = 47``."""
        lines = []
        for _ in range(self.rng.randint(5, 10)):
            op, a, b, c = self.equation()
            lines.append(f"{a} {op} {b} = {c}")
        return "\n".join(lines)

    def doc_words(self) -> str:
        """Arithmetic in words: ``The sum of 46 and 16 is 62.``"""
        out = []
        for _ in range(self.rng.randint(3, 6)):
            op, a, b, c = self.equation()
            out.append(self.rng.choice(_WORDS[op]).format(a=a, b=b, c=c))
        return " ".join(out)

    def doc_story(self) -> str:
        """Word problems as running text: question, worked solution, the answer in words."""
        out = []
        for _ in range(self.rng.randint(1, 3)):
            pr = self.problem()
            out.append(f"{pr.question} {' '.join(pr.steps)} So the answer is {pr.result}.")
        return "\n".join(out)

    def doc_qa(self) -> str:
        """``Question:``/``Answer:`` text with short answers (never the ``####`` format)."""
        out = []
        for _ in range(self.rng.randint(2, 4)):
            if self.rng.random() < 0.5:
                op, a, b, c = self.equation()
                q, ans = _QA[op].format(a=a, b=b), str(c)
            else:
                pr = self.problem()
                q = pr.question
                ans = str(pr.result) if self.rng.random() < 0.5 else f"The answer is {pr.result}."
            out.append(format_prompt(q) + " " + ans)
        return "\n\n".join(out)

    def doc_prose(self) -> str:
        return self.prose()

    def document(self, mix: Mapping[str, float]) -> str:
        """One pre-training document of a kind drawn with the weights of ``mix`` (``DOC_MIX``)."""
        kinds, weights = zip(*mix.items())
        return getattr(self, f"doc_{self.rng.choices(kinds, weights=weights)[0]}")()


_WORDS = {"+": ["The sum of {a} and {b} is {c}.", "{a} plus {b} equals {c}.",
                "If you add {b} to {a}, you get {c}."],
          "-": ["{a} minus {b} equals {c}.", "If you take {b} away from {a}, you get {c}.",
                "The difference between {a} and {b} is {c}."],
          "*": ["{a} times {b} is {c}.", "{a} groups of {b} make {c}."],
          "/": ["Half of {a} is {c}.", "{a} divided by {b} is {c}."]}
_QA = {"+": "What is {a} plus {b}?", "-": "What is {a} minus {b}?", "*": "What is {a} times {b}?",
       "/": "What is half of {a}?"}


# ----------------------------------------------------------------------------- corpus


class ProblemSource:
    """Word-problem splits of one seed: the test split first, then any other split, with no
    question repeated across splits and no test addition or subtraction in another split.

    ``prefix`` names the seed's random streams (one per split, ``PREFIX/NAME``), so a split's
    records do not depend on the sizes of the others.
    """

    def __init__(self, prefix: str, max_number: int, n_test: int) -> None:
        if n_test > 2000:
            raise SftscopeError(f"n_test={n_test} is too many for the demo's small problems; "
                                "use at most 2000")
        self.prefix, self.max_number = prefix, max_number
        self.seen: set[str] = set()
        self.test = _Writer(self.stream("test"), max_number).problems(n_test, self.seen)
        self.held_out = {k for pr in self.test for k in pr.keys if k[0] in HELD_OUT_OPS}

    def stream(self, name: str) -> random.Random:
        """The random stream of split ``name``."""
        return random.Random(f"{self.prefix}/{name}")

    def problems(self, name: str, n: int) -> list[Problem]:
        """``n`` problems of split ``name``: new questions, no held-out computation."""
        return _Writer(self.stream(name), self.max_number, self.held_out).problems(n, self.seen)


def make_corpus(seed: int = 0, n_pretrain: int = 20_000, n_sft: int = 2_000, n_test: int = 200,
                n_train: int = 500, n_general: int = 200, max_number: int = 99,
                doc_mix: Mapping[str, float] | None = None) -> Corpus:
    """Generate every split, deterministically from ``seed`` (see the module docstring).

    ``n_pretrain`` counts documents (about 60 tokens each with the demo tokenizer). Each split
    has its own random stream, so changing one size leaves the other splits' first records
    unchanged. Test computations (``a + b``, ``a - b``) are withheld from all other splits.
    ``max_number`` bounds every number in a problem or drill (results included). ``doc_mix``:
    shares of the pre-training document kinds (default ``DOC_MIX``).
    """
    for name, n in [("n_pretrain", n_pretrain), ("n_sft", n_sft), ("n_test", n_test),
                    ("n_train", n_train), ("n_general", n_general)]:
        if n < 0:
            raise SftscopeError(f"{name} must be >= 0, got {n}")
    if not 20 <= max_number <= 999:
        raise SftscopeError(f"max_number must be in 20..999, got {max_number}")
    mix = check_doc_mix(DOC_MIX if doc_mix is None else doc_mix)
    src = ProblemSource(f"sftscope-demo/{seed}", max_number, n_test)
    sft, train = src.problems("sft", n_sft), src.problems("gsm8k_train", n_train)
    w = _Writer(src.stream("pretrain"), max_number, src.held_out)
    pretrain = [w.document(mix) for _ in range(n_pretrain)]
    w = _Writer(src.stream("general"), max_number)
    general = [{"text": w.prose((5, 9))} for _ in range(n_general)]
    return Corpus(
        seed=seed, pretrain=pretrain, sft=[p.record() for p in sft],
        gsm8k_train=[p.record() for p in train], gsm8k_test=[p.record() for p in src.test],
        general=general,
    )


def check_doc_mix(mix: Mapping[str, float]) -> dict[str, float]:
    """``mix`` as a dict, or one clear error: kinds of ``DOC_MIX`` only, shares >= 0, some > 0."""
    mix = dict(mix)
    unknown = sorted(set(mix) - set(DOC_MIX))
    if unknown:
        raise SftscopeError(f"unknown pre-training document kind(s) {', '.join(unknown)}; "
                            f"use {', '.join(DOC_MIX)}")
    if any(not v >= 0 for v in mix.values()) or not sum(mix.values()) > 0:
        raise SftscopeError(f"pre-training document shares must be >= 0 and not all 0, got {mix}")
    return mix


def write_corpus(corpus: Corpus, out_dir: str | Path) -> dict[str, Path]:
    """Write each split as JSONL (``pretrain`` and ``general`` as ``{"text"}``), atomically."""
    import json

    out_dir = Path(out_dir)
    rows = {
        "pretrain": [{"text": t} for t in corpus.pretrain], "sft": corpus.sft,
        "gsm8k_train": corpus.gsm8k_train, "gsm8k_test": corpus.gsm8k_test,
        "general": corpus.general,
    }
    paths = {}
    for name, recs in rows.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        paths[name] = write_text(out_dir / FILES[name], text)
    return paths
