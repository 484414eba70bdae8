"""Streaming tokenization: text pieces in, token-id chunks out, memory bounded by the piece size."""
from __future__ import annotations

import itertools
from typing import Iterable, Iterator

PIECE_CHARS = 1 << 16


def _cut(text: str) -> int:
    """Last position where whitespace follows a non-space character (BPE merges never cross it here)."""
    for i in range(len(text) - 1, 0, -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return i
    return 0


def iter_token_ids(tokenizer, texts: Iterable[str], piece_chars: int = PIECE_CHARS) -> Iterator[list[int]]:
    """Tokenize a stream of text pieces without ever holding the whole text.

    Pieces are cut just before a whitespace run, so a word is never split between two tokenizer calls."""
    buf = ""
    for text in texts:
        buf += text
        while len(buf) >= piece_chars:
            cut = _cut(buf[:piece_chars]) or piece_chars
            ids = tokenizer.encode(buf[:cut], add_special_tokens=False)
            buf = buf[cut:]
            if ids:
                yield ids
    if buf:
        ids = tokenizer.encode(buf, add_special_tokens=False)
        if ids:
            yield ids


def rechunk(pieces: Iterable[list[int]], size: int) -> Iterator[list[int]]:
    """Regroup id lists into lists of exactly `size` ids (the last one may be shorter)."""
    buf: list[int] = []
    for ids in pieces:
        buf.extend(ids)
        while len(buf) >= size:
            yield buf[:size]
            buf = buf[size:]
    if buf:
        yield buf


def peek(pieces: Iterable[list[int]], limit: int) -> tuple[list[int] | None, Iterator[list[int]]]:
    """Read `pieces` until they hold more than `limit` ids: (every id, an empty stream) when the stream ended
    first, else (None, the whole stream again from its start). Holds at most `limit` ids plus one piece."""
    it = iter(pieces)
    head: list[list[int]] = []
    n = 0
    for ids in it:
        head.append(ids)
        n += len(ids)
        if n > limit:
            return None, itertools.chain(head, it)
    return [i for ids in head for i in ids], iter(())
