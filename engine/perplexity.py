"""Streaming perplexity: token chunks in, NLL of every next token out, through any cache policy.

The last position of a chunk predicts the first token of the next one, so every token after the first is
scored exactly once whatever the stride. The error estimate follows llama.cpp's perplexity tool: the standard
error of the mean NLL, propagated through exp()."""
from __future__ import annotations

import math
import time
from array import array
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from .runner import Runner

ROWS_PER_HEAD_CALL = 256  # LM-head rows at a time: logits [256, V] fp32 stay ~50 MB for a 49K vocabulary


@dataclass
class PerplexityResult:
    policy: str
    n_scored: int = 0  # tokens whose NLL was measured (all but the first)
    nll_sum: float = 0.0
    nll_sq_sum: float = 0.0
    seconds: float = 0.0
    nll: array = field(default_factory=lambda: array("f"))  # per token, kept when asked (plots)
    # log-probabilities [V] fp32 predicted by the last position fed: they score the next chunk's first token
    carry: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n_tokens(self) -> int:
        return self.n_scored + 1 if self.n_scored else 0

    @property
    def nll_mean(self) -> float:
        return self.nll_sum / max(self.n_scored, 1)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_mean)

    @property
    def ppl_err(self) -> float:
        n = self.n_scored
        if n < 2:
            return float("nan")
        var = max(self.nll_sq_sum / n - self.nll_mean**2, 0.0)
        return self.ppl * math.sqrt(var / (n - 1))

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds else 0.0

    def bits_per_byte(self, n_bytes: int) -> float:
        return self.nll_sum / math.log(2) / n_bytes if n_bytes else float("nan")


def perplexity_steps(
    runner: Runner,
    chunks: Iterable[list[int]],
    result: PerplexityResult,
    keep_nll: bool = False,
) -> Iterator[int]:
    """Feed `chunks` (lists of <= stride ids) through `runner`, scoring every token into `result` and yielding
    the tokens fed so far after each chunk (between chunks: `result` and the cache are consistent there, so the
    driver may checkpoint both).

    `result` may continue a run resumed from a checkpoint (its sums, time and carried log-probabilities, with
    the runner's cache restored); it is updated in place after every chunk."""
    device = next(runner.model.parameters()).device
    carry = result.carry  # log-probabilities predicted by the previous chunk's last position [V]
    done = result.n_scored + (carry is not None)  # tokens fed so far: all scored but the very first
    start = time.perf_counter() - result.seconds
    for ids in chunks:
        x = torch.tensor([ids], dtype=torch.long, device=device)
        hidden = runner.step(x)[0]  # [L, hidden]
        nll = []
        if carry is not None:
            nll.append(-carry[ids[0]].view(1))
        for r0 in range(0, len(ids), ROWS_PER_HEAD_CALL):
            r1 = min(len(ids), r0 + ROWS_PER_HEAD_CALL)
            logp = torch.log_softmax(runner.logits(hidden[r0:r1]), dim=-1)  # [rows, V]
            targets = x[0, r0 + 1 : r1 + 1]
            nll.append(-logp[: targets.numel()].gather(1, targets.unsqueeze(1)).squeeze(1))
            if r1 == len(ids):
                carry = logp[-1]
        values = torch.cat(nll).double()
        result.n_scored += values.numel()
        result.nll_sum += values.sum().item()
        result.nll_sq_sum += (values * values).sum().item()
        if keep_nll:
            result.nll.extend(values.float().tolist())
        done += len(ids)
        result.carry = carry
        result.seconds = time.perf_counter() - start
        yield done


def perplexity(
    runner: Runner,
    chunks: Iterable[list[int]],
    on_chunk: Callable[[int], None] | None = None,
    keep_nll: bool = False,
    result: PerplexityResult | None = None,
) -> PerplexityResult:
    """`perplexity_steps` run to the end; `on_chunk(tokens_done)` after each chunk. `result`: a run to continue
    (a checkpoint's), else a fresh one."""
    result = result if result is not None else PerplexityResult(runner.config.policy)
    for done in perplexity_steps(runner, chunks, result, keep_nll):
        if on_chunk is not None:
            on_chunk(done)
    return result
