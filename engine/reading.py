"""Read an input once through the cache, then answer: the engine side of `summarize` and `ask`.

    runner = Runner(model, config, n_sinks=max(config.sinks, len(prompt.prefix_ids)))   # the prefix is pinned
    check_room(config, runner.n_sinks, limit, len(prompt.suffix_ids), max_tokens)
    for done in ingest_steps(runner, prompt.prefix_ids, token_pieces):   # prefix, then the input in chunks
        ...                                                              # between chunks: progress, checkpoints
    for text in answer(runner, tokenizer, prompt.suffix_ids, max_tokens, ...):   # request, then decoding
        ...

`ingest_steps` yields once per input chunk, so whoever drives it (the CLI's one loop, cascadectl/driver.py; a
notebook; `ingest` below) decides what happens between chunks, where the cache is whole and may be saved.
Only the last position's logits are ever computed (no LM head over the input). Decoding goes through the same
cache, which keeps evicting, so with `cascade` and `sink` positions stay below sinks + cache + stride however
long the input and the answer are."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch

from .config import CacheConfig
from .errors import CapacityError, ConfigError
from .generate import GREEDY, Sampling, generate
from .runner import Runner
from .tokens import rechunk


def stop_ids(tokenizer, model=None) -> frozenset[int]:
    """End-of-sequence id, the chat end-of-turn token `<|im_end|>` when the vocabulary has it, and the eos ids of
    `model`'s generation_config (its authors' list can hold more than the tokenizer's one)."""
    ids = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    end_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if hasattr(tokenizer, "convert_tokens_to_ids") else None
    if isinstance(end_turn, int) and end_turn != getattr(tokenizer, "unk_token_id", None):
        ids.add(end_turn)
    return frozenset(ids)


def check_room(
    config: CacheConfig,
    n_sinks: int,
    limit: int,
    n_suffix: int,
    max_tokens: int,
    n_prefix_and_input: int | None = None,
    extra_positions: int = 0,
) -> str | None:
    """Fail before any work when reading and answering cannot fit the model's positions; returns a warning or None.

    `cascade`/`sink` positions never pass sinks + cache + stride (+ `extra_positions`, the question queries of
    question-guided retention); `full` needs prefix + input + request + `max_tokens` positions, so it needs
    `n_prefix_and_input`. The warning says when the request and answer outgrow the newest sub-cache, which then
    starts to evict the request while the answer is being written (answers from the frozen cache,
    engine/batch_answer.py, evict nothing: the CLI holds the warning back for them)."""
    if max_tokens < 1:
        raise ConfigError(f"`max_tokens` must be >= 1 (got {max_tokens})")
    if config.policy == "full":
        total = (n_prefix_and_input or 0) + n_suffix + max_tokens
        if total > limit:
            raise CapacityError(
                f"`policy=full` needs {total:,} positions (prompt and input {n_prefix_and_input:,} + request "
                f"{n_suffix} + `max_tokens` {max_tokens}) but the model has {limit:,}; lower `max_tokens` or use "
                f"`policy` cascade or sink"
            )
        return None
    config.check_positions(n_sinks, limit)
    top = config.max_position(n_sinks) + extra_positions
    if top >= limit:
        raise CapacityError(
            f"sinks ({n_sinks}) + `cache_size` ({config.cache_size}) + `stride` ({config.stride}) + the question "
            f"({extra_positions} tokens) = {top + 1} positions, more than the model's {limit}; lower `cache_size` "
            f"or `stride`"
        )
    newest = config.cache_size // config.n_cascades
    if n_suffix + max_tokens > newest:
        return (
            f"the request ({n_suffix} tokens) + `max_tokens` ({max_tokens}) exceed the newest sub-cache "
            f"({newest} slots): the request may be evicted while answering; raise `cache_size` or lower `max_tokens`"
        )
    return None


def _feed(runner: Runner, ids: list[int]) -> torch.Tensor:
    device = next(runner.model.parameters()).device
    return runner.step(torch.tensor([ids], dtype=torch.long, device=device))


def ingest_steps(
    runner: Runner,
    prefix_ids: list[int],
    token_pieces: Iterable[list[int]],
    resume_at: int | None = None,
) -> Iterator[int]:
    """Feed the pinned prefix, then the input in chunks of `stride` tokens, yielding the input tokens done after
    each input chunk (between chunks: the cache is whole there).

    The prefix lands in the sinks when the runner was built with n_sinks >= len(prefix_ids). `resume_at`: the
    runner's cache comes from a checkpoint that already holds the prefix and that many input tokens, and
    `token_pieces` holds the rest of the input."""
    stride = runner.config.stride
    if resume_at is None:
        for ids in rechunk([prefix_ids], stride):
            _feed(runner, ids)
    done = resume_at or 0
    for ids in rechunk(token_pieces, stride):
        _feed(runner, ids)
        done += len(ids)
        yield done


def ingest(
    runner: Runner,
    prefix_ids: list[int],
    token_pieces: Iterable[list[int]],
    on_chunk: Callable[[int], None] | None = None,
    resume_at: int | None = None,
) -> int:
    """`ingest_steps` run to the end; returns the input's token count. `on_chunk(input_tokens_done)` is called
    after each input chunk."""
    done = resume_at or 0
    for done in ingest_steps(runner, prefix_ids, token_pieces, resume_at):
        if on_chunk is not None:
            on_chunk(done)
    return done


@contextmanager
def forked(runner: Runner, keep: Callable | None = None) -> Iterator:
    """Run the block on a copy of the runner's cache (answers append to the cache: the next question must find
    it as the ingest left it); `keep(copy)` may narrow the copy first (engine.evidence.restrict). The runner's
    own cache is back in place afterwards, whatever happened."""
    with torch.inference_mode():
        twin = copy.deepcopy(runner.cache)
    if keep is not None:
        keep(twin)
    base = runner.replace_cache(twin)
    try:
        yield twin
    finally:
        runner.replace_cache(base)


class TextStream:
    """Incremental detokenization: ids in one at a time, text out as soon as it is final.

    Decodes a short window of recent ids twice (with and without the newest) and emits the difference, so
    multi-byte characters split over tokens and tokenizers that merge or strip spaces print correctly."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window start, end of what was already emitted

    def _text(self, a: int, b: int) -> str:
        return self.tokenizer.decode(self.ids[a:b], skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before, after = self._text(self.prefix, self.read), self._text(self.prefix, len(self.ids))
        if len(after) <= len(before) or after.endswith("\ufffd"):  # incomplete character: wait for more ids
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        before, after = self._text(self.prefix, self.read), self._text(self.prefix, len(self.ids))
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def answer(
    runner: Runner,
    tokenizer,
    suffix_ids: list[int],
    max_tokens: int,
    sampling: Sampling = GREEDY,
    stop: Iterable[int] = frozenset(),
    on_token: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """Append the closing request (in chunks of at most `stride`), then yield the answer's text as it is decoded.

    Greedy unless `sampling` says otherwise; `stop` ids end the answer (not printed); `on_token(id)` sees every
    generated id. Leading whitespace of the answer is not yielded."""
    if not suffix_ids:
        raise ValueError("the closing request is empty; the answer needs at least one token to start from")
    hidden = None
    for ids in rechunk([suffix_ids], runner.config.stride):
        hidden = _feed(runner, ids)
    logits = runner.logits(hidden[:, -1])[0]  # [V]; only the last position is needed
    text = AnswerText(tokenizer)
    for token in generate(runner, logits, max_tokens, sampling, frozenset(stop)):
        if on_token is not None:
            on_token(token)
        piece = text.push(token)
        if piece:
            yield piece
    tail = text.flush()
    if tail:
        yield tail


class AnswerText:
    """An answer's text as its ids arrive (`TextStream`), without the leading whitespace that chat models often
    open with: the answer starts at its first visible character."""

    def __init__(self, tokenizer):
        self.stream = TextStream(tokenizer)
        self.started = False

    def push(self, token: int) -> str:
        piece = self.stream.push(token)
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        return piece

    def flush(self) -> str:
        tail = self.stream.flush()
        if not tail or not (self.started or tail.strip()):
            return ""
        return tail if self.started else tail.lstrip()
