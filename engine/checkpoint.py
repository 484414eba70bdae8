"""Checkpoints of a long ingest, and resuming from one with exactly the result of an uninterrupted run.

A checkpoint is a cache snapshot (engine/snapshot.py) taken between two chunks, plus where the input stood:
the number of input tokens fed so far and a sha256 of their ids, and the caller's own state (perplexity
accumulators, elapsed time, ...). To resume, the caller re-reads and re-tokenizes the input, `skip` consumes
that many tokens and compares their hash (a changed input is refused), and the rest is cut into the same
stride-long chunks as before, because every chunk but the last is exactly `stride` long:

    ckpt = Checkpoint(path, lm, config, "ppl", every=65536)
    snap = ckpt.load()                                   # only when resuming: cache + state, checked
    chunks = ckpt.track(rechunk(ckpt.skip(pieces), config.stride))
    ... after each chunk:  if ckpt.due(done): ckpt.save(runner.cache, state, tensors)

The engine installs no signal handler: the CLI sets a flag on Ctrl-C and saves at the next chunk boundary."""
from __future__ import annotations

import hashlib
import sys
from array import array
from dataclasses import asdict
from typing import Iterable, Iterator

from torch import Tensor

from .config import CacheConfig
from .errors import CascadeError, ConfigError
from .snapshot import Snapshot, load_snapshot, save_snapshot

DEFAULT_EVERY = 65536  # tokens between periodic checkpoints: ~6 min at 180 tok/s on a 2-core CPU


class InputChangedError(CascadeError):
    """The input no longer starts with the tokens a checkpoint consumed."""


def ids_sha256(ids: Iterable[int]) -> str:
    """sha256 of token ids as little-endian int64 (the checkpoint's fingerprint of what was read)."""
    return hashlib.sha256(_bytes(ids)).hexdigest()


def _bytes(ids) -> bytes:
    a = array("q", ids)  # int64 whatever the platform; little-endian so that hashes travel between machines
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


class TokenLedger:
    """Count and running sha256 of the token ids fed so far."""

    def __init__(self) -> None:
        self.count = 0
        self._h = hashlib.sha256()

    def add(self, ids: list[int]) -> None:
        self._h.update(_bytes(ids))
        self.count += len(ids)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class Checkpoint:
    """Periodic snapshots of one ingest (`command` = ppl, summarize or ask) and resuming from one.

    `identity`: values that must be the same on resume besides the model and cache settings, e.g. the sha256
    of the pinned prompt; a mismatch is refused naming the key's description in `labels`."""

    def __init__(self, path: str, lm, config: CacheConfig, command: str, every: int = DEFAULT_EVERY,
                 identity: dict | None = None, labels: dict | None = None):
        self.path, self.lm, self.config, self.command, self.every = path, lm, config, command, every
        self.identity, self.labels = identity or {}, labels or {}
        self.ledger = TokenLedger()
        self.resume_at: int | None = None  # input tokens already in the loaded cache
        self._expected_sha = ""
        self.saved_at = 0  # input tokens covered by the newest checkpoint on disk

    def load(self) -> Snapshot:
        """Read and check the checkpoint; its cache goes to the runner, meta["extra"]["state"] to the caller."""
        snap = load_snapshot(self.path, self.lm, asdict(self.config), self._inspect)
        extra = snap.meta["extra"]
        done, sha = extra.get("tokens_done"), extra.get("tokens_sha256")
        if type(done) is not int or done < 0 or not isinstance(sha, str) or not isinstance(extra.get("state"), dict):
            raise CascadeError(f"{self.path} is not a usable checkpoint (no input position)")
        self.resume_at, self._expected_sha, self.saved_at = done, sha, done
        return snap

    def _inspect(self, meta: dict) -> None:
        """A checkpoint of this command with this identity (checked before the cache settings)."""
        extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
        if extra.get("kind") != "checkpoint":
            raise ConfigError(f"{self.path} is a saved cache, not a checkpoint; use it with `load_cache`")
        if extra.get("command") != self.command:
            raise ConfigError(f"{self.path} is a checkpoint of `{extra.get('command')}`, not of `{self.command}`")
        for key, want in self.identity.items():
            if extra.get(key) != want:
                what = self.labels.get(key, key)
                raise ConfigError(f"{self.path} was made with another {what}; use the same one to resume, "
                                  f"or start over without `resume`")

    def skip(self, pieces: Iterable[list[int]]) -> Iterator[list[int]]:
        """The input's token pieces after the ones the loaded checkpoint consumed, once their hash matches.

        The skipped tokens are read and checked now, before any model work; without a loaded checkpoint the
        pieces are returned as they are."""
        if not self.resume_at:
            return iter(pieces)
        it = iter(pieces)
        rest: list[int] = []
        n = self.resume_at
        while self.ledger.count < n:
            piece = next(it, None)
            if piece is None:
                break
            take = n - self.ledger.count
            self.ledger.add(piece[:take])
            rest = piece[take:]
        if self.ledger.count < n or self.ledger.hexdigest() != self._expected_sha:
            raise InputChangedError(
                f"the input changed since {self.path} was written (its first {n:,} tokens differ); "
                f"resume with the same input, or start over without `resume`")

        def tail() -> Iterator[list[int]]:
            if rest:
                yield rest
            yield from it

        return tail()

    def track(self, chunks: Iterable[list[int]]) -> Iterator[list[int]]:
        """Pass the chunks on, hashing each as it is handed to the model (the ledger then matches `done`)."""
        for ids in chunks:
            self.ledger.add(ids)
            yield ids

    def due(self, done: int) -> bool:
        return done - self.saved_at >= self.every

    def save(self, cache, state: dict, tensors: dict[str, Tensor] | None = None) -> int:
        """Snapshot `cache` (between chunks) with the input position and the caller's `state`; returns bytes."""
        meta = {"kind": "checkpoint", "command": self.command, **self.identity, "tokens_done": self.ledger.count,
                "tokens_sha256": self.ledger.hexdigest(), "state": state}
        size = save_snapshot(self.path, cache, self.lm, self.config, meta, tensors)
        self.saved_at = self.ledger.count
        return size
