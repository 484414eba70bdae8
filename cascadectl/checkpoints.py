"""`--checkpoint FILE`, `--checkpoint-every N`, `--resume`: the CLI side of engine/checkpoint.py.

Every command that ingests (ppl, summarize, ask) does the same four things:

    ckpt = checkpoints.for_run(opts, lm, config, "ppl")         # None without --checkpoint; checks the options
    snap = ckpt.load() if opts.resume else None                  # cache + state from the file, checked
    ... driver.drive(steps, ..., ckpt=ckpt, save=...)            # saves when due and on Ctrl-C
    checkpoints.done(ckpt)                                       # the run completed: the file is removed

Exit codes: a checkpoint made with another model, dtype, cache settings, prompt or command, or a --checkpoint path
that cannot be written (missing or read-only directory), is a usage error (2: change the options); a missing or
damaged file and a changed input are runtime failures (1)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Optional

import typer

from engine.checkpoint import DEFAULT_EVERY, Checkpoint
from engine.config import CacheConfig
from engine.errors import CascadeError, ConfigError
from engine.perplexity import PerplexityResult
from engine.tokens import rechunk

from .common import check_output_path

CheckpointFile = Annotated[Optional[str], typer.Option(
    "--checkpoint", rich_help_panel="Checkpoint", show_default=False, metavar="FILE",
    help="Save the ingest's state to FILE every --checkpoint-every tokens and on Ctrl-C (removed when done).")]
CheckpointEvery = Annotated[int, typer.Option(
    "--checkpoint-every", rich_help_panel="Checkpoint", metavar="N",
    help="Input tokens between checkpoints (rounded up to a whole chunk).")]
Resume = Annotated[bool, typer.Option(
    "--resume", rich_help_panel="Checkpoint",
    help="Continue from --checkpoint FILE: same result as an uninterrupted run.")]


@dataclass(frozen=True)
class CheckpointOptions:
    path: str | None
    every: int = DEFAULT_EVERY
    resume: bool = False

    def check(self) -> None:
        """Option errors, before any model is loaded."""
        if self.path is None:
            if self.resume:
                raise ConfigError("--resume needs --checkpoint FILE (the checkpoint to continue from)")
            return
        if self.every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1 (got {self.every})")
        check_output_path(self.path, "--checkpoint")  # fail now, not at the first checkpoint an hour from now
        if self.resume and not os.path.exists(self.path):
            raise CascadeError(f"no checkpoint at {self.path} to resume from; run without --resume to start")
        if not self.resume and os.path.exists(self.path):
            raise ConfigError(f"{self.path} already exists: pass --resume to continue from it, or remove it to "
                              f"start over")


def for_run(opts: CheckpointOptions, lm, config: CacheConfig, command: str, identity: dict | None = None,
         labels: dict | None = None) -> Checkpoint | None:
    """The run's checkpoint, or None without --checkpoint."""
    if opts.path is None:
        return None
    return Checkpoint(opts.path, lm, config, command, opts.every, identity, labels)


def done(ckpt: Checkpoint | None) -> None:
    """The run completed: its checkpoint is of no further use."""
    if ckpt is not None and os.path.exists(ckpt.path):
        os.unlink(ckpt.path)


def ppl_state(result: PerplexityResult) -> tuple[dict, dict]:
    """(JSON state, tensors) of a perplexity run between chunks; floats round-trip exactly through JSON."""
    state = {"n_scored": result.n_scored, "nll_sum": result.nll_sum, "nll_sq_sum": result.nll_sq_sum,
             "seconds": result.seconds}
    return state, ({"carry": result.carry} if result.carry is not None else {})


def ppl_result(policy: str, state: dict, tensors: dict, device) -> PerplexityResult:
    """A PerplexityResult to continue from, out of a checkpoint's state."""
    try:
        result = PerplexityResult(policy, n_scored=int(state["n_scored"]), nll_sum=float(state["nll_sum"]),
                                  nll_sq_sum=float(state["nll_sq_sum"]), seconds=float(state["seconds"]))
    except (KeyError, TypeError, ValueError):
        raise CascadeError("the checkpoint holds no perplexity state; start over without --resume") from None
    carry = tensors.get("carry")
    result.carry = carry.to(device) if carry is not None else None
    return result


def ppl_stream(ckpt: Checkpoint | None, opts: CheckpointOptions, runner, source, policy: str):
    """(chunks to feed, result to continue): everything after the checkpoint when resuming, else everything."""
    result = PerplexityResult(policy)
    if ckpt is None:
        return rechunk(source, runner.config.stride), result
    if opts.resume:
        snap = ckpt.load()
        runner.replace_cache(snap.cache)
        device = next(runner.model.parameters()).device
        result = ppl_result(policy, snap.meta["extra"]["state"], snap.extra_tensors, device)
    return ckpt.track(rechunk(ckpt.skip(source), runner.config.stride)), result
