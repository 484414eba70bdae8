"""Generation settings of `summarize` and `ask`: their options, and the options given over the model's own
generation_config."""
from __future__ import annotations

from functools import partial
from typing import Annotated, Callable, Optional

import typer

from engine.generate import Sampling
from engine.models import LoadedModel
from engine.reading import stop_ids

from .console import Say

MaxTokens = Annotated[int, typer.Option("--max-tokens", "-t", rich_help_panel="Generation",
                                        help="Most tokens to generate per answer.")]
# Unset sampling options come from the model's generation_config; the embedded SmolLM2 sets none, so it is greedy.
Temperature = Annotated[Optional[float], typer.Option(
    "--temperature", rich_help_panel="Generation", show_default=False,
    help="0 = greedy (argmax); higher samples more freely. Default: the model's generation_config, which samples "
         "only when it sets do_sample (the embedded SmolLM2 sets nothing: greedy).")]
TopP = Annotated[Optional[float], typer.Option(
    "--top-p", rich_help_panel="Generation", show_default=False,
    help="Sample among the fewest tokens whose probability reaches P, 0 < P <= 1 (asks for sampling). Default: "
         "the model's top_p (embedded: off).")]
TopK = Annotated[Optional[int], typer.Option(
    "--top-k", rich_help_panel="Generation", show_default=False,
    help="Sample among the K likeliest tokens, 0 = off (asks for sampling). Default: the model's top_k "
         "(embedded: off).")]
MinP = Annotated[Optional[float], typer.Option(
    "--min-p", rich_help_panel="Generation", show_default=False,
    help="Drop tokens less likely than P x the likeliest one, 0 <= P <= 1 (asks for sampling). Default: the "
         "model's min_p (embedded: off).")]
RepeatPenalty = Annotated[Optional[float], typer.Option(
    "--repeat-penalty", rich_help_panel="Generation", show_default=False,
    help="> 1 lowers the logits of tokens already in the answer (greedy too; 1 = off). Default: the model's "
         "repetition_penalty (embedded: off).")]
NoRepeatNgram = Annotated[Optional[int], typer.Option(
    "--no-repeat-ngram", rich_help_panel="Generation", show_default=False, metavar="N",
    help="Never write the same N tokens twice in one answer (greedy too; 0 = off). Default: the model's "
         "no_repeat_ngram_size; when the model sets no repetition control and --repeat-penalty is not given, 4 "
         "(small models loop otherwise). --temperature 0 is plain greedy: only what is given applies.")]
Seed = Annotated[int, typer.Option("--seed", rich_help_panel="Generation", help="Sampling seed.")]
Report = Annotated[bool, typer.Option("--report", rich_help_panel="Output",
                                      help="Print on stderr how the cached tokens spread over the input.")]
Words = Annotated[Optional[int], typer.Option("--words", "-w", rich_help_panel="Generation", show_default=False,
                                              help="Target length of the answer in words.")]
Instruction = Annotated[Optional[str], typer.Option("--instruction", "-i", rich_help_panel="Generation",
                                                    show_default=False, help="Replace the request to the model.")]
MAX_TOKENS = 256


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
