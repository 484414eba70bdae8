"""Retention of a repeated segment: how far back does each policy still hold what it read?

No instruction following is needed. A segment (random token ids, or a span of prose) is placed in real text
and repeated after a gap; a model that still holds the first copy predicts the second almost perfectly (an
induction copy), one that lost it pays the segment's full surprise. One sample is one pass:

    lead prose (LEAD tokens) | segment | prose ........................................ (largest gap)
                                        ^ gap g1     ^ gap g2            ^ gap g3
                                        at each gap point: copy the cache, feed the segment again into the
                                        copy and measure its mean NLL, drop the copy, continue the main stream

so one pass serves every gap. The first copy's own NLL (same prose before it, no earlier copy) is the
baseline. NLL is the mean over the segment's tokens but the first (nothing can predict where a copy starts).
`gap` = prose tokens between the end of the first copy and the start of the second."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import CacheConfig
from ..perplexity import perplexity
from ..reading import forked
from ..runner import Runner
from ..tokens import rechunk

LEAD = 256  # prose tokens before the first copy: the segment never lands among the sink tokens
SEGMENTS = ("random", "prose")


@dataclass(frozen=True)
class RetentionSample:
    sample: int
    lead_ids: list[int]
    segment_ids: list[int]
    gap_ids: list[int]  # prose after the first copy, as long as the largest gap

    def first_copy(self) -> int:
        """Stream index of the first copy's first token."""
        return len(self.lead_ids)

    def second_copy(self, gap: int) -> int:
        """Stream index of the second copy's first token, for `gap`."""
        return len(self.lead_ids) + len(self.segment_ids) + gap

    def stream(self, gap: int) -> list[int]:
        """The whole token stream a measurement at `gap` sees, second copy included (tests, dense checks)."""
        return self.lead_ids + self.segment_ids + self.gap_ids[:gap] + self.segment_ids

    def positions(self, gap: int) -> int:
        """Positions the stream for `gap` needs under `full` (absolute positions)."""
        return self.second_copy(gap) + len(self.segment_ids)


@dataclass
class RetentionRun:
    policy: str
    sample: int
    baseline: float  # mean NLL of the first copy (no earlier copy)
    nll: dict[int, float] = field(default_factory=dict)  # gap -> mean NLL of the second copy
    tokens: int = 0  # tokens fed, copies included
    seconds: float = 0.0


def vocabulary(tokenizer, vocab_size: int) -> list[int]:
    """Ids a random segment may use: the model's vocabulary without the tokenizer's special and added tokens."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", None) or {})
    size = min(vocab_size, len(tokenizer)) if hasattr(tokenizer, "__len__") else vocab_size
    return [i for i in range(size) if i not in special]


def make_sample(prose, vocab: list[int], max_gap: int, segment_tokens: int, segment: str, seed: int,
                sample: int, lead: int = LEAD) -> RetentionSample:
    """Deterministic from (seed, sample): a window of prose (lead + largest gap) and the segment."""
    if segment not in SEGMENTS:
        raise ValueError(f"segment must be one of {SEGMENTS} (got {segment!r})")
    rng = random.Random(f"retention:{seed}:{sample}")
    window = prose.tokens(rng, lead + max_gap)
    if segment == "random":
        seg = [rng.choice(vocab) for _ in range(segment_tokens)]
    else:  # a span from elsewhere in the prose: partly predictable even without a copy (the baseline says how much)
        seg = prose.tokens(rng, segment_tokens)
    return RetentionSample(sample, window[:lead], seg, window[lead:])


def _segment_nll(runner: Runner, ids: list[int]) -> float:
    """Mean NLL of ids[1:] fed after the runner's cache (ids[0] is not scored)."""
    return perplexity(runner, rechunk([ids], runner.config.stride)).nll_mean


def run_sample(model, config: CacheConfig, sample: RetentionSample, gaps: list[int],
               on_tokens: Callable[[int], None] | None = None) -> RetentionRun:
    """One pass of `sample` through a fresh runner of `config`, measuring the second copy at every gap.

    `on_tokens(n)` after every chunk with the tokens fed since the last call."""
    start = time.perf_counter()
    gaps = sorted(gaps)
    stride = config.stride
    seg = sample.segment_ids
    expected = sample.positions(gaps[-1]) if gaps and config.policy == "full" else 0
    run = RetentionRun(config.policy, sample.sample, 0.0)

    def feed(ids: list[int]) -> None:
        for chunk in rechunk([ids], stride):
            runner.step(torch.tensor([chunk], dtype=torch.long, device=device))
            run.tokens += len(chunk)
            if on_tokens is not None:
                on_tokens(len(chunk))

    with Runner(model, config, expected_tokens=expected) as runner:
        device = next(model.parameters()).device
        feed(sample.lead_ids)
        run.baseline = _segment_nll(runner, seg)
        run.tokens += len(seg)
        if on_tokens is not None:
            on_tokens(len(seg))
        done = 0
        for gap in gaps:
            feed(sample.gap_ids[done:gap])  # chunks end exactly at the gap point
            done = gap
            with forked(runner):  # the segment is read from a copy: the next gap continues the main stream
                run.nll[gap] = _segment_nll(runner, seg)
            run.tokens += len(seg)
            if on_tokens is not None:
                on_tokens(len(seg))
    run.seconds = time.perf_counter() - start
    return run


def summarize(runs: list[RetentionRun]) -> list[dict]:
    """Per policy: the baseline and the second copy's NLL at every gap, averaged over samples."""
    by_policy: dict[str, list[RetentionRun]] = {}
    for r in runs:
        by_policy.setdefault(r.policy, []).append(r)
    rows = []
    for policy, rs in by_policy.items():
        gaps = sorted({g for r in rs for g in r.nll})
        nll = {}
        for g in gaps:
            values = [r.nll[g] for r in rs if g in r.nll]
            nll[g] = sum(values) / len(values)
        rows.append({"policy": policy, "samples": len(rs), "baseline": sum(r.baseline for r in rs) / len(rs),
                     "nll": nll})
    return rows
