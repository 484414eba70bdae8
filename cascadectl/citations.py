"""Citations for `ask`: the evidence spans the cache kept whole, as records for --json and lines on stderr.

A span's text comes from the document, so it is shown literally: control characters (ANSI escapes among them)
become spaces or visible escapes and rich markup is escaped, so nothing a document contains can drive the
terminal."""
from __future__ import annotations

import unicodedata
from pathlib import Path

from rich.markup import escape

from engine.evidence import kept_spans
from engine.cache import EvidenceCascadeCache
from engine.retention_report import SourceMap

from .console import console

SHOWN = 3  # passages on stderr without --report
WIDTH = 100  # characters of a passage on its line
_MAX_SCAN = 64 << 20  # files up to this size are searched for a passage's line number


def evidence_fill(cache) -> tuple[int, int] | None:
    """(slots holding a token, slots) of the cache's evidence store, or None without one."""
    if isinstance(cache, EvidenceCascadeCache):
        return cache.n_evidence, cache.evidence
    return None


def printable(text: str) -> str:
    """`text` on one line with nothing a terminal acts on: whitespace runs become one space, other control and
    format characters (ESC, BEL, bidi overrides, ...) their escaped code point."""
    out = []
    for ch in text:
        if ch.isspace():
            if not out or out[-1] != " ":
                out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out).strip()


def _label(source_map: SourceMap, index: int) -> tuple[str | None, int | None]:
    """(source, page) of input token `index`."""
    found = None
    for start, label in zip(source_map.starts, source_map.labels):
        if start > index:
            break
        found = label
    return found if found is not None else (None, None)


def _line(source: str | None, page: int | None, text: str, cache: dict) -> int | None:
    """1-based line of `text` in a plain-text file `source`, when it can be found there (not for PDF pages,
    stdin or files over 64 MiB)."""
    needle = text.strip()
    if not source or source == "-" or page is not None or not needle:
        return None
    if source not in cache:
        content = None
        try:
            path = Path(source)
            if path.is_file() and path.stat().st_size <= _MAX_SCAN:
                content = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            pass
        cache[source] = content
    content = cache[source]
    at = content.find(needle) if content else -1
    return content.count("\n", 0, at) + 1 if at >= 0 else None


def evidence_records(cache, n_prefix: int, source_map: SourceMap, tokenizer, question: int | None = None) -> list[dict]:
    """The kept spans, strongest first: {source, page, line, token_start, token_end, text, score} with token
    offsets in the input (the pinned prompt not counted); of the `question`-th share of a several-question
    store when given. Empty without an evidence store."""
    if not isinstance(cache, EvidenceCascadeCache):
        return []
    files: dict = {}
    out = []
    for span in kept_spans(cache, question):
        start = span.start - n_prefix
        source, page = _label(source_map, start)
        text = tokenizer.decode(list(span.ids), skip_special_tokens=True)
        out.append({"source": source, "page": page, "line": _line(source, page, text, files),
                    "token_start": start, "token_end": span.end - n_prefix, "text": text,
                    "score": round(span.score, 6)})
    return out


def print_citations(records: list[dict], every: bool = False, question: int | None = None) -> None:
    """The strongest passages (all of them with `every`, i.e. --report) on stderr, one line each; `question`:
    the number of the question they belong to, when there were several."""
    shown = records if every else records[:SHOWN]
    which = "the question" if question is None else f"question {question}"
    console.print(f"[bold]Evidence[/]: {len(records)} passage{'s' if len(records) != 1 else ''} kept whole for "
                  f"{which}{'' if every or len(records) <= SHOWN else f' (the {SHOWN} strongest; all: --report)'}")
    for n, r in enumerate(shown, 1):
        where = printable(str(r["source"] or "input"))
        if r["page"] is not None:
            where += f" p.{r['page']}"
        if r["line"] is not None:
            where += f" line {r['line']}"
        text = printable(r["text"])
        if len(text) > WIDTH:
            text = text[: WIDTH - 1] + "…"
        console.print(f"  {escape(f'[{n}]')} {escape(where)} · tokens {r['token_start']:,}–{r['token_end']:,} · score "
                      f"{r['score']:.3f} · “{escape(text)}”", soft_wrap=True, highlight=False)
