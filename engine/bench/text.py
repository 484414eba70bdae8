"""Token sources for the benchmarks: repeated-sentence noise, windows of real prose, word boundaries.

Both fillers hand out token ids directly, so a sample's length is exact in tokens whatever the tokenizer.
`Prose` tokenizes its file once (the bundled novel: ~172K tokens, ~1 s) and serves windows from a seeded
offset, wrapping around at the end, so any length is available."""
from __future__ import annotations

import random
from pathlib import Path

from ..errors import CascadeError
from ..tokens import iter_token_ids

# Our own filler sentences, in the spirit of the passkey literature: bland, repetitive, never a number.
NOISE = (
    "The river runs slowly past the old mill.",
    "The hills are quiet in the evening.",
    "A lamp burns in the window of the house.",
    "The road goes on across the fields.",
    "Here we wait, and then we walk on again.",
)


def bundled_text() -> Path:
    """The public-domain novel shipped in the repository's data/ folder (absent from a plain wheel install)."""
    return Path(__file__).resolve().parents[2] / "data" / "pride_and_prejudice.txt"


class Noise:
    """The same few sentences repeated; every sample gets the same filler (only the key and depth vary)."""

    name = "noise"

    def __init__(self, tokenizer):
        # A leading space makes every repetition tokenize like the one before it, so tiling the ids is exact.
        self.unit = list(tokenizer.encode(" " + " ".join(NOISE), add_special_tokens=False))

    def tokens(self, rng: random.Random, n: int) -> list[int]:
        reps = -(-n // len(self.unit))
        return (self.unit * reps)[:n]


class Prose:
    """Windows of a text file's tokens from a random offset (drawn from `rng`), wrapping at the end."""

    name = "prose"

    def __init__(self, tokenizer, path: str | Path | None = None):
        self.path = Path(path) if path is not None else bundled_text()
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                ids = [i for piece in iter_token_ids(tokenizer, iter(lambda: f.read(1 << 16), "")) for i in piece]
        except OSError as e:
            hint = " (the bundled novel ships with the source checkout; pass --text FILE)" if path is None else ""
            raise CascadeError(f"cannot read {self.path}: {e.strerror or e}{hint}") from None
        if len(ids) < 64:
            raise CascadeError(f"{self.path} has only {len(ids)} tokens; the prose filler needs at least 64")
        self.ids = ids

    def tokens(self, rng: random.Random, n: int) -> list[int]:
        start = rng.randrange(len(self.ids))
        out = self.ids[start : start + n]
        while len(out) < n:
            out += self.ids[: n - len(out)]
        return out


def word_start(tokenizer, ids: list[int], pos: int, reach: int = 8) -> int:
    """The index nearest to `pos` (within `reach`) whose token starts with whitespace, i.e. begins a word.

    Inserting text there never splits a word in two; `pos` itself when no such token is near."""
    for offset in range(reach + 1):
        for i in (pos - offset, pos + offset):
            if 0 <= i < len(ids) and tokenizer.decode([ids[i]])[:1].isspace():
                return i
    return pos
