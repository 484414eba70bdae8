"""Passkey retrieval: a 5-digit key stated once inside long filler; can the model repeat it at the end?

One sample, `length` tokens in all (the chat frame included):

    prefix   chat head + instruction [+ question]            pinned in the sinks (question-first: it also
                                                               guides what the cascade keeps, engine.retention)
    document filler[:at] + " The pass key is 71432. Remember it. 71432 is the pass key." + filler[at:]
    suffix   request + question + chat tail + "The pass key is"   -> greedy decoding of a few tokens

`at` = depth × (filler length), moved to the nearest word start. The key, the filler (its offset in the prose)
and so the whole sample follow from (seed, length, depth, sample index) alone: every policy and both prompt
orders see the same document. Scoring (score_answer): the first run of 5 or more digits in the answer must
be the key (exact); per-digit accuracy = matching positions / 5 (a shorter run is compared as far as it goes)."""
from __future__ import annotations

import contextlib
import random
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from ..config import CacheConfig
from ..errors import ConfigError
from ..prompt import build_prompt
from ..evidence import QUOTE, EvidenceSelector, quoted_closing
from ..retention import QuestionGuide
from ..runner import Runner
from ..reading import answer, check_room, ingest, stop_ids
from .grid import policy_name
from .text import word_start

INSTRUCTION = ("A pass key is hidden somewhere in the document below, among a lot of irrelevant text. "
               "Find it and remember it.")
REQUEST = "Answer with the pass key stated in the document above."
QUESTION = "What is the pass key?"
ANSWER_START = "The pass key is "  # trailing space: its own token, as before the key in the needle
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PROMPTS = ("first", "last")  # where the question is: pinned before the document too, or only after it
MIN_FILLER = 16  # filler tokens a sample needs at least (else --lengths is too short for the prompt)


@dataclass(frozen=True)
class PasskeySample:
    """One prompt, as token ids; `needle_at` = index of the needle's first token in `doc_ids`."""

    length: int
    depth: float
    sample: int
    prompt: str  # "first" or "last"
    key: str
    prefix_ids: list[int]
    doc_ids: list[int]
    suffix_ids: list[int]
    needle_at: int
    needle_len: int
    question_span: tuple[int, int] | None

    @property
    def n_tokens(self) -> int:
        return len(self.prefix_ids) + len(self.doc_ids) + len(self.suffix_ids)

    @property
    def actual_depth(self) -> float:
        """Where the needle starts, as a fraction of the filler it was put in."""
        return self.needle_at / max(len(self.doc_ids) - self.needle_len, 1)


@dataclass
class PasskeyResult:
    policy: str
    prompt: str
    length: int
    depth: float
    sample: int
    key: str
    answer: str
    parsed: str | None  # the digits read from the answer (None: no digit at all)
    exact: bool
    digits: float  # per-digit accuracy in [0, 1]
    needle_position: int  # token index of the needle in the whole prompt
    tokens: int  # prompt tokens read (prefix + document + suffix)
    seconds: float


def sample_rng(seed: int, length: int, depth: float, sample: int) -> random.Random:
    """Deterministic across runs and platforms (a str seed is hashed with SHA-512, not Python's hash())."""
    return random.Random(f"passkey:{seed}:{length}:{depth!r}:{sample}")


def make_sample(tokenizer, filler, length: int, depth: float, sample: int, prompt: str, seed: int) -> PasskeySample:
    """Build one sample of exactly `length` tokens; ConfigError when `length` cannot hold the prompt."""
    if prompt not in PROMPTS:
        raise ConfigError(f"--prompt must be one of {', '.join(PROMPTS)} (got {prompt!r})")
    rng = sample_rng(seed, length, depth, sample)
    key = str(rng.randrange(10_000, 100_000))
    frame = build_prompt(tokenizer, INSTRUCTION, REQUEST, QUESTION, question_first=prompt == "first")
    suffix = frame.suffix_ids + list(tokenizer.encode(ANSWER_START, add_special_tokens=False))
    needle = list(tokenizer.encode(NEEDLE.format(key=key), add_special_tokens=False))
    n_filler = length - len(frame.prefix_ids) - len(suffix) - len(needle)
    if n_filler < MIN_FILLER:
        need = length - n_filler + MIN_FILLER
        raise ConfigError(f"--lengths: {length} tokens cannot hold the prompt and the pass key; use lengths of "
                          f"at least {need}")
    filler = filler.tokens(rng, n_filler)
    at = word_start(tokenizer, filler, round(depth * n_filler))
    doc = filler[:at] + needle + filler[at:]
    return PasskeySample(length, depth, sample, prompt, key, frame.prefix_ids, doc, suffix, at, len(needle),
                         frame.question_span)


def score_answer(key: str, text: str) -> tuple[str | None, bool, float]:
    """(digits read, exact match, per-digit accuracy) of an answer.

    The digits read are the first run of at least 5 digits, else the first (shorter) run; exact means that run
    is the key itself (so "714320" is not exact), per-digit compares its first 5 digits position by position."""
    runs = re.findall(r"\d+", text)
    if not runs:
        return None, False, 0.0
    got = next((r for r in runs if len(r) >= len(key)), runs[0])
    digits = sum(a == b for a, b in zip(got, key)) / len(key)
    return got, got == key, digits


def fits_full(sample: PasskeySample, max_tokens: int, limit: int) -> bool:
    """Does `full` (absolute positions) have room for the prompt and the answer?"""
    return sample.n_tokens + max_tokens <= limit


def check_sample(config: CacheConfig, sample: PasskeySample, limit: int, max_tokens: int,
                 guided: bool) -> str | None:
    """Fail before any work when `config` cannot run `sample` (engine.reading.check_room); a warning or None."""
    n_sinks = max(config.sinks, len(sample.prefix_ids))
    q = sample.question_span[1] - sample.question_span[0] if guided and sample.question_span else 0
    return check_room(config, n_sinks, limit, len(sample.suffix_ids), max_tokens,
                      len(sample.prefix_ids) + len(sample.doc_ids), q)


def is_guided(config: CacheConfig, sample: PasskeySample, question_weight: float) -> bool:
    """Question-guided retention applies where the cache scores tokens (cascade) and the question comes first."""
    return config.policy == "cascade" and sample.question_span is not None and question_weight > 0


def read_and_answer(model, tokenizer, config: CacheConfig, sample, max_tokens: int, question_weight: float = 1.0,
                    on_chunk: Callable[[int], None] | None = None,
                    evidence_layers: dict[int, float] | None = None) -> str:
    """Read `sample` through a fresh runner of `config` and decode greedily; the answer's text.

    `sample` is any prompt with prefix_ids, doc_ids, suffix_ids and question_span (a PasskeySample, an
    engine.bench.ruler.RulerSample). With `config.evidence` slots and the question first, an evidence store keeps
    spans chosen by the question (engine/evidence.py) from the layers in `evidence_layers`
    (engine.evidence.retrieval_layers); otherwise the evidence slots are dropped."""
    n_sinks = max(config.sinks, len(sample.prefix_ids))
    expected = sample.n_tokens + max_tokens if config.policy == "full" else 0
    if config.evidence and (sample.question_span is None or not evidence_layers):
        config = config.with_evidence(0)
    with Runner(model, config, n_sinks=n_sinks, expected_tokens=expected) as runner:
        guided = is_guided(config, sample, question_weight)
        guide = (QuestionGuide(runner, sample.question_span, question_weight if guided else 0.0)
                 if guided or config.evidence else contextlib.nullcontext())
        keep = (EvidenceSelector(runner, guide, evidence_layers, len(sample.prefix_ids))
                if config.evidence else contextlib.nullcontext())
        with guide, keep:
            ingest(runner, sample.prefix_ids, [sample.doc_ids], on_chunk)
        suffix, _ = quoted_closing(runner.cache, tokenizer, sample.suffix_ids, QUOTE, max_tokens)  # as ask does
        return "".join(answer(runner, tokenizer, suffix, max_tokens, stop=stop_ids(tokenizer)))


def run_sample(model, tokenizer, config: CacheConfig, sample: PasskeySample, max_tokens: int = 12,
               question_weight: float = 1.0, on_chunk: Callable[[int], None] | None = None,
               evidence_layers: dict[int, float] | None = None) -> PasskeyResult:
    """Read the sample through a fresh runner of `config`, decode greedily, score. `on_chunk(doc tokens done)`.

    With `config.evidence` slots and the question first, an evidence store keeps spans chosen by the question
    (engine/evidence.py) from the layers in `evidence_layers` (engine.evidence.retrieval_layers); the result's
    policy is then "cascade+evidence" (engine.bench.grid.policy_name)."""
    start = time.perf_counter()
    text = read_and_answer(model, tokenizer, config, sample, max_tokens, question_weight, on_chunk, evidence_layers)
    parsed, exact, digits = score_answer(sample.key, text)
    return PasskeyResult(policy_name(config), sample.prompt, sample.length, sample.depth, sample.sample, sample.key,
                         text, parsed, exact, digits, len(sample.prefix_ids) + sample.needle_at, sample.n_tokens,
                         time.perf_counter() - start)


def summarize(results: Iterable[PasskeyResult]) -> list[dict]:
    """Mean exact and per-digit accuracy per (policy, prompt, length, depth) cell, in first-seen order."""
    cells: dict[tuple, list[PasskeyResult]] = {}
    for r in results:
        cells.setdefault((r.policy, r.prompt, r.length, r.depth), []).append(r)
    return [{"policy": p, "prompt": q, "length": n, "depth": d, "samples": len(rs),
             "exact": sum(r.exact for r in rs) / len(rs), "digits": sum(r.digits for r in rs) / len(rs)}
            for (p, q, n, d), rs in cells.items()]
