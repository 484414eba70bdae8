"""Generation settings of `summarize` and `ask`: the options given, over the model's own generation_config."""
from __future__ import annotations

from functools import partial
from typing import Callable

from engine.generate import Sampling
from engine.models import LoadedModel
from engine.reading import stop_ids

from .console import Say


def sampling_for(temperature: float | None, top_p: float | None, top_k: int | None, min_p: float | None,
                 repeat_penalty: float | None, seed: int,
                 no_repeat_ngram: int | None = None) -> Callable[[LoadedModel], Sampling]:
    """Check the options now, before any model loads; the function returned settles them against a model."""
    resolve = partial(Sampling.from_model, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                      repeat_penalty=repeat_penalty, no_repeat_ngram=no_repeat_ngram, seed=seed)
    resolve(None)  # ConfigError (exit 2) naming the option
    if temperature == 0 and any(v is not None for v in (top_p, top_k, min_p)):
        Say.warn("--top-p, --top-k and --min-p have no effect with --temperature 0 (greedy)")
    return lambda lm: resolve(getattr(lm.model, "generation_config", None))


def record(sampling: Sampling, lm: LoadedModel) -> dict:
    """The `generation` fields of the --json record that say how tokens were picked."""
    return {**sampling.as_dict(), "stop_ids": sorted(stop_ids(lm.tokenizer, lm.model))}
