"""Decoding: one token at a time through the same runner (a decode step is a chunk of one token)."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from .runner import Runner


def sample(logits: Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else a draw from softmax(logits / temperature); logits [V] float32."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate(
    runner: Runner,
    logits: Tensor,
    max_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    stop_ids: set[int] | frozenset[int] = frozenset(),
) -> Iterator[int]:
    """Yield up to `max_tokens` ids, starting from the next-token logits [V]; stops at any id in `stop_ids`."""
    generator = torch.Generator().manual_seed(seed)
    device = next(runner.model.parameters()).device
    for i in range(max_tokens):
        token = sample(logits, temperature, generator)
        if token in stop_ids:
            return
        yield token
        if i + 1 < max_tokens:
            hidden = runner.step(torch.tensor([[token]], device=device))
            logits = runner.logits(hidden[:, -1])[0]
