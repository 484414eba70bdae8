"""Decoding: one token at a time through the same runner (a decode step is a chunk of one token).

Sampling calls transformers' own logits processors, in the order `model.generate` applies them: repetition
penalty, then temperature, top-k, top-p and min-p. Temperature 0 is the argmax of the raw logits (greedy)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from torch import Tensor
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .errors import ConfigError
from .runner import Runner


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits; the defaults are greedy decoding (`GREEDY`)."""

    temperature: float = 0.0  # 0: greedy, the argmax; > 0: a draw from softmax(processed logits / temperature)
    top_k: int | None = None  # sample among the k likeliest tokens only (None or 0: off)
    top_p: float | None = None  # ... among the fewest tokens whose probability reaches top_p (None or 1: off)
    min_p: float | None = None  # drop tokens less likely than min_p x the likeliest one (None or 0: off)
    repeat_penalty: float | None = None  # > 1 lowers tokens already in the answer, greedy too (None or 1: off)
    no_repeat_ngram: int | None = None  # n: no n-gram of the answer twice, greedy too (None or 0: off)
    seed: int = 0  # of the CPU generator that draws the samples
    model_defaults: tuple[str, ...] = field(default=(), compare=False)  # fields from the model's generation_config

    def __post_init__(self):
        rules = [("--temperature", self.temperature, ">= 0", lambda x: x >= 0),
                 ("--top-k", self.top_k, ">= 0", lambda x: x >= 0),
                 ("--top-p", self.top_p, "in (0, 1]", lambda x: 0 < x <= 1),
                 ("--min-p", self.min_p, "in [0, 1]", lambda x: 0 <= x <= 1),
                 ("--repeat-penalty", self.repeat_penalty, "> 0", lambda x: x > 0),
                 ("--no-repeat-ngram", self.no_repeat_ngram, ">= 0", lambda x: x >= 0 and x == int(x))]
        for flag, value, rule, ok in rules:
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise ConfigError(f"{flag} must be {rule} (got {value})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_model(cls, generation_config=None, *, temperature: float | None = None, top_k: int | None = None,
                   top_p: float | None = None, min_p: float | None = None, repeat_penalty: float | None = None,
                   no_repeat_ngram: int | None = None, seed: int = 0) -> "Sampling":
        """The model's `generation_config` (its authors' defaults) under the settings given (None: not given).

        Only fields the config sets count, not transformers' fallbacks such as top_k=50. The model samples by
        default only when it sets `do_sample`; a given top_k, top_p or min_p also asks for sampling (at the
        model's temperature, else 1). `temperature=0` is plain greedy: nothing is taken from the model, and only
        a given `repeat_penalty` or `no_repeat_ngram` applies. When neither is given nor set by the model, no
        n-gram of NO_REPEAT_NGRAM tokens is written twice (small models loop otherwise: docs/RESULTS.md).
        Raises ConfigError for values out of range."""
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                 "repeat_penalty": repeat_penalty, "no_repeat_ngram": no_repeat_ngram}
        if temperature == 0:
            cls(top_k=top_k, top_p=top_p, min_p=min_p)  # checked, though greedy decoding has no use for them
            return cls(repeat_penalty=repeat_penalty, no_repeat_ngram=no_repeat_ngram, seed=seed)
        model = {name: getattr(generation_config, key, None) for name, key in
                 (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"),
                  ("repeat_penalty", "repetition_penalty"), ("no_repeat_ngram", "no_repeat_ngram_size"))}
        if not model["no_repeat_ngram"]:  # transformers' default 0 means unset
            model["no_repeat_ngram"] = None
        asked = any(v is not None for v in (temperature, top_k, top_p, min_p))
        samples = asked or bool(getattr(generation_config, "do_sample", None))
        if not samples:  # greedy, as the model asks; its repetition controls apply, as in model.generate
            model = {"repeat_penalty": model["repeat_penalty"], "no_repeat_ngram": model["no_repeat_ngram"]}
        chosen = {name: model.get(name) if value is None else value for name, value in given.items()}
        if chosen["repeat_penalty"] is None and chosen["no_repeat_ngram"] is None:
            chosen["no_repeat_ngram"] = NO_REPEAT_NGRAM
        taken = tuple(name for name, value in given.items() if value is None and model.get(name) is not None)
        if samples and not asked:
            taken = ("do_sample", *taken)
        t = chosen["temperature"]
        chosen["temperature"] = (1.0 if t is None else float(t)) if samples else 0.0
        return cls(**chosen, seed=seed, model_defaults=taken)

    def processors(self) -> LogitsProcessorList:
        """transformers' processors for these settings; empty for plain greedy."""
        out = LogitsProcessorList()
        if self.repeat_penalty is not None and self.repeat_penalty != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(float(self.repeat_penalty)))
        if self.no_repeat_ngram:
            out.append(NoRepeatNGramLogitsProcessor(int(self.no_repeat_ngram)))
        if self.greedy:
            return out
        out.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k:
            out.append(TopKLogitsWarper(int(self.top_k)))
        if self.top_p is not None and self.top_p < 1.0:
            out.append(TopPLogitsWarper(float(self.top_p)))
        if self.min_p:
            out.append(MinPLogitsWarper(float(self.min_p)))
        return out

    def as_dict(self) -> dict:
        return {**asdict(self), "do_sample": not self.greedy, "model_defaults": list(self.model_defaults)}


GREEDY = Sampling()
NO_REPEAT_NGRAM = 4  # the fallback when neither the user nor the model sets a repetition control


def next_token(logits: Tensor, sampling: Sampling, processors: LogitsProcessorList, answer: list[int],
               generator: torch.Generator | None) -> int:
    """The next id from next-token logits [V] float32; `answer`: the ids generated so far (repetition penalty)."""
    if processors:
        ids = torch.tensor([answer], dtype=torch.long, device=logits.device)  # [1, N]
        logits = processors(ids, logits[None])[0]  # [1, V] -> [V]
    if sampling.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate(
    runner: Runner,
    logits: Tensor,
    max_tokens: int,
    sampling: Sampling = GREEDY,
    stop_ids: set[int] | frozenset[int] = frozenset(),
) -> Iterator[int]:
    """Yield up to `max_tokens` ids, starting from the next-token logits [V]; stops at any id in `stop_ids`.

    The repetition penalty counts the answer's own ids, not the input's (which a summary must be free to quote)."""
    generator = torch.Generator().manual_seed(sampling.seed)
    processors = sampling.processors()
    answer: list[int] = []
    for i in range(max_tokens):
        token = next_token(logits, sampling, processors, answer, generator)
        if token in stop_ids:
            return
        answer.append(token)
        yield token
        if i + 1 < max_tokens:
            logits = runner.decode(token)  # on a GPU a replayed CUDA graph (engine/decode_graph.py)
