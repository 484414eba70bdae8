"""RULER-style tasks (arXiv 2404.06654): several facts stated once in long filler, scored by string containment.

Each sample is `length` tokens in all, in the passkey frame (engine/bench/passkey.py: instruction and, with the
question first, the question pinned in the sinks; the document; the request, the question and an answer start):

    multikey    KEYS facts " The special magic number for <word> is <n>." at random depths; one word is asked,
                expected: its number
    multivalue  VALUES facts " One of the special magic numbers for <word> is <n>." for one word; all are asked,
                expected: every number
    vartrack    " VAR QPWZ = 48213." then HOPS facts " VAR XKCD = VAR QPWZ." ..., in this order; which variables
                hold 48213? expected: every name of the chain

Words, numbers, names, depths and the filler's offset follow from (task, seed, sample index) alone, so every
policy, prompt order and length sees the same facts at the same relative depths (fractions of the filler, drawn
before its length is known), and a --lengths error's "at least N" holds for the sample it names. Scoring is
RULER's string_match_all: score = share of the expected strings that appear in the answer (case-insensitive),
exact = all of them appear."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from ..config import CacheConfig
from ..errors import ConfigError
from ..prompt import build_prompt
from .grid import parse_choices, policy_name
from .passkey import MIN_FILLER, PROMPTS, read_and_answer
from .text import word_start

KEYS, VALUES, HOPS = 4, 4, 4  # RULER's defaults: niah_multikey_1 (4 keys), niah_multivalue (4 values), vt (4 hops)
# Keys of the magic numbers: concrete nouns that neither the noise filler nor each other contain.
WORDS = (
    "anchor", "apricot", "badger", "banjo", "beacon", "biscuit", "blizzard", "bonnet", "cactus", "canoe",
    "carpet", "cello", "chimney", "cobalt", "compass", "copper", "cricket", "dolphin", "falcon", "fiddle",
    "garnet", "ginger", "glacier", "goblet", "granite", "harpoon", "hazel", "helmet", "iguana", "jasmine",
    "kettle", "kiwi", "lantern", "lemur", "lobster", "magnet", "mango", "marble", "meadowlark", "mitten",
    "nectar", "nutmeg", "orchid", "otter", "paddle", "parsley", "pebble", "pelican", "pepper", "quartz",
    "quiver", "raven", "saffron", "sapphire", "scarf", "spindle", "squirrel", "thimble", "tulip", "turnip",
    "umbrella", "velvet", "walrus", "zebra",
)
CONSONANTS = "BCDFGHJKLMNPQRSTVWXZ"  # variable names without vowels are never English words a model may write


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    request: str
    max_tokens: int  # greedy tokens decoded by default: room for every expected string


TASKS = {t.name: t for t in (
    Task("multikey", "Some special magic numbers are hidden in the document below, among a lot of irrelevant "
                     "text. Find them and remember them: you will be asked for one of them.",
         "Answer with the special magic number that the question asks for.", 12),
    Task("multivalue", "Some special magic numbers are hidden in the document below, among a lot of irrelevant "
                       "text. Find them and remember them: you will be asked for them.",
         "Answer with all the special magic numbers that the question asks for.", 32),
    Task("vartrack", "Variables are assigned values in the document below, one after the other, among a lot of "
                     "irrelevant text. Follow the chain of assignments: you will be asked which variables hold "
                     "a value.",
         "Answer with the names of all the variables that the question asks for.", 32),
)}


@dataclass(frozen=True)
class RulerSample:
    """One prompt, as token ids; the facts in document order, `fact_at[i]` = index of fact i's first token in
    `doc_ids`."""

    task: str
    length: int
    sample: int
    prompt: str  # "first" or "last"
    query: str  # what the question names: the word (multikey, multivalue) or the value (vartrack)
    expected: tuple[str, ...]
    statements: tuple[str, ...]  # the facts' text, in document order
    prefix_ids: list[int]
    doc_ids: list[int]
    suffix_ids: list[int]
    fact_at: tuple[int, ...]
    fact_len: tuple[int, ...]
    question_span: tuple[int, int] | None

    @property
    def n_tokens(self) -> int:
        return len(self.prefix_ids) + len(self.doc_ids) + len(self.suffix_ids)


@dataclass
class RulerResult:
    task: str
    policy: str
    prompt: str
    length: int
    sample: int
    query: str
    expected: list[str]
    answer: str
    found: list[str]  # the expected strings that appear in the answer
    score: float  # len(found) / len(expected)
    exact: bool  # every expected string appears
    fact_positions: list[int]  # token index of each fact in the whole prompt
    tokens: int  # prompt tokens read (prefix + document + suffix)
    seconds: float


def sample_rng(task: str, seed: int, sample: int) -> random.Random:
    """Deterministic across runs and platforms (a str seed is hashed with SHA-512, not Python's hash())."""
    return random.Random(f"ruler:{task}:{seed}:{sample}")


def _numbers(rng: random.Random, n: int) -> list[str]:
    return [str(v) for v in rng.sample(range(10_000, 100_000), n)]


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(CONSONANTS) for _ in range(4))


def _content(task: str, rng: random.Random) -> tuple[list[str], str, str, str, tuple[str, ...]]:
    """(facts in document order, question, answer start, query, expected strings) of one sample."""
    if task == "multikey":
        words, numbers = rng.sample(WORDS, KEYS), _numbers(rng, KEYS)
        facts = [f"The special magic number for {w} is {n}." for w, n in zip(words, numbers)]
        asked = rng.randrange(KEYS)  # facts are in random order already (the words are a random sample)
        w = words[asked]
        return (facts, f"What is the special magic number for {w}?", f"The special magic number for {w} is ", w,
                (numbers[asked],))
    if task == "multivalue":
        w, numbers = rng.choice(WORDS), _numbers(rng, VALUES)
        facts = [f"One of the special magic numbers for {w} is {n}." for n in numbers]
        return (facts, f"What are all the special magic numbers for {w}?",
                f"The special magic numbers for {w} are ", w, tuple(numbers))
    if task == "vartrack":
        value = _numbers(rng, 1)[0]
        names: list[str] = []
        while len(names) < HOPS + 1:
            name = _name(rng)
            if name not in names:
                names.append(name)
        facts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        return (facts, f"Which variables are assigned the value {value}?",
                f"The variables assigned the value {value} are:", value, tuple(names))
    raise ConfigError(f"--tasks: {task!r} is not one of {', '.join(TASKS)}")


def make_sample(tokenizer, filler, task: str, length: int, sample: int, prompt: str, seed: int) -> RulerSample:
    """Build one sample of exactly `length` tokens; ConfigError when `length` cannot hold the prompt and facts."""
    if prompt not in PROMPTS:
        raise ConfigError(f"--prompt must be one of {', '.join(PROMPTS)} (got {prompt!r})")
    rng = sample_rng(task, seed, sample)
    facts, question, answer_start, query, expected = _content(task, rng)
    depths = sorted(rng.random() for _ in facts)
    spec = TASKS[task]
    frame = build_prompt(tokenizer, spec.instruction, spec.request, question, question_first=prompt == "first")
    suffix = frame.suffix_ids + list(tokenizer.encode(answer_start, add_special_tokens=False))
    fact_ids = [list(tokenizer.encode(" " + f, add_special_tokens=False)) for f in facts]
    n_filler = length - len(frame.prefix_ids) - len(suffix) - sum(map(len, fact_ids))
    if n_filler < MIN_FILLER:
        need = length - n_filler + MIN_FILLER
        raise ConfigError(f"--lengths: {length} tokens cannot hold the prompt and the {len(facts)} facts of {task} "
                          f"(sample {sample}); use lengths of at least {need}")
    body = filler.tokens(rng, n_filler)
    cuts = sorted(word_start(tokenizer, body, round(d * n_filler)) for d in depths)
    doc: list[int] = []
    at = []
    prev = 0
    for cut, ids in zip(cuts, fact_ids):
        doc += body[prev:cut]
        at.append(len(doc))
        doc += ids
        prev = cut
    doc += body[prev:]
    return RulerSample(task, length, sample, prompt, query, expected, tuple(facts), frame.prefix_ids, doc, suffix,
                       tuple(at), tuple(map(len, fact_ids)), frame.question_span)


def score_answer(expected: Iterable[str], text: str) -> tuple[list[str], float, bool]:
    """(expected strings found in `text`, their share, all found), case-insensitive as RULER's string_match_all."""
    expected = list(expected)
    low = text.lower()
    found = [e for e in expected if e.lower() in low]
    return found, len(found) / len(expected), len(found) == len(expected)


def run_sample(model, tokenizer, config: CacheConfig, sample: RulerSample, max_tokens: int | None = None,
               question_weight: float = 1.0, on_chunk: Callable[[int], None] | None = None,
               evidence_layers: dict[int, float] | None = None) -> RulerResult:
    """Read, answer greedily (engine.bench.passkey.read_and_answer, the passkey path: guide, evidence) and score;
    `max_tokens` None = the task's own."""
    start = time.perf_counter()
    n = TASKS[sample.task].max_tokens if max_tokens is None else max_tokens
    text = read_and_answer(model, tokenizer, config, sample, n, question_weight, on_chunk, evidence_layers)
    found, score, exact = score_answer(sample.expected, text)
    return RulerResult(sample.task, policy_name(config), sample.prompt, sample.length, sample.sample, sample.query,
                       list(sample.expected), text, found, score, exact,
                       [len(sample.prefix_ids) + a for a in sample.fact_at], sample.n_tokens,
                       time.perf_counter() - start)


def summarize(results: Iterable[RulerResult]) -> list[dict]:
    """Mean score and exact rate per (task, policy, prompt, length) cell, in first-seen order."""
    cells: dict[tuple, list[RulerResult]] = {}
    for r in results:
        cells.setdefault((r.task, r.policy, r.prompt, r.length), []).append(r)
    return [{"task": t, "policy": p, "prompt": q, "length": n, "samples": len(rs),
             "score": sum(r.score for r in rs) / len(rs), "exact": sum(r.exact for r in rs) / len(rs)}
            for (t, p, q, n), rs in cells.items()]


def task_means(cells: Iterable[dict]) -> list[dict]:
    """The mean over tasks of each (policy, prompt, length): every task weighs the same, whatever its samples."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["policy"], c["prompt"], c["length"]), []).append(c)
    return [{"policy": p, "prompt": q, "length": n, "tasks": [c["task"] for c in cs],
             "score": sum(c["score"] for c in cs) / len(cs), "exact": sum(c["exact"] for c in cs) / len(cs)}
            for (p, q, n), cs in groups.items()]


def parse_tasks(text: str) -> list[str]:
    """--tasks: a comma-separated subset of TASKS, in the order given."""
    return parse_choices(text, "--tasks", tuple(TASKS))
