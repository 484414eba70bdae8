"""Fuzz target (c): random folder trees through the directory walk of cascadectl/inputs.py.

Each example builds a tree of folders, text files, empty files, binaries, PDFs (good and broken), FIFOs,
unreadable files and folders (refused by a patched `open`/`scandir`, so that it also works as root), and symlinks
(to an ancestor, to a sibling, to themselves, dangling), under names with spaces, `$HOME`, `~`, `*` and hidden
dots. Property: the walk ends (no hang on a FIFO or a loop), only `InputError` escapes and only when there is no
text at all, no path is read twice, no hidden path is read, every plainly reachable text file is read, and every
skip has a known reason.
"""
from __future__ import annotations

import os
import re
import tempfile
from unittest import mock

import pytest
from hypothesis import strategies as st

from cascadectl import inputs
from cascadectl.inputs import FILE_HEADER, InputError, InputReport, iter_segments, total_bytes_estimate
from tests.fuzz.budget import QUICK_EXAMPLES, fuzz_for, per_example_timeout
from tests.fuzz.hostile import image_only_pdf_bytes, sample_pdf, truncated

# Includes names that are not UTF-8 (Latin-1 "été", a lone 0xff), which Python carries as lone surrogates.
NAMES = ["a", "b", "c d", ".h", "$HOME", "~", "*", "é", "x;y", os.fsdecode(b"\xe9t\xe9"), os.fsdecode(b"\xff")]
LOCKED = "L"  # names starting with this are refused by the patched open/scandir (no other name starts with it)
KINDS = ["dir", "text", "text", "text", "empty", "binary", "pdf", "scan", "badpdf", "link-up", "link-dir",
         "link-file", "link-self", "link-dangling", "fifo", "locked", "locked-dir"]
REASONS = ("hidden", "broken symlink", "unreadable", "folder already read via another path (symlink)",
           "not a regular file", "binary", "empty", "PDF could not be parsed", "PDF has no extractable text")

ENTRY = st.tuples(
    st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),  # where: parent folders + the entry's own name
    st.sampled_from(KINDS),
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=40),
    st.integers(0, 10),  # picks a link target
)
TREES = st.lists(ENTRY, max_size=14)


def build(root: str, entries) -> list[str]:
    """Create the entries under `root`; returns the relative paths of text files a walk must read."""
    made_dirs = [""]
    texts = []
    for parts, kind, content, pick in entries:
        parent = os.path.join(*parts[:-1]) if len(parts) > 1 else ""
        name = parts[-1]
        try:
            os.makedirs(os.path.join(root, parent), exist_ok=True)
        except OSError:  # a file or link already sits where a folder should be
            continue
        made_dirs.extend(os.path.join(*parts[:i]) for i in range(1, len(parts)))
        if kind in ("locked", "locked-dir"):
            name = LOCKED + name
        rel = os.path.join(parent, name)
        path = os.path.join(root, rel)
        if os.path.lexists(path) or os.path.lexists(path + ".pdf"):
            continue
        target = made_dirs[pick % len(made_dirs)]
        if kind in ("dir", "locked-dir"):
            os.mkdir(path)
            made_dirs.append(rel)
            if kind == "locked-dir":  # something worth reading that the walk cannot list
                with open(os.path.join(root, rel, "inside.txt"), "w", encoding="utf-8") as f:
                    f.write(content)
        elif kind in ("text", "locked"):
            with open(path, "w", encoding="utf-8") as f:
                f.write(content)
            if kind == "text":
                texts.append(rel)
        elif kind == "empty":
            open(path, "wb").close()
        elif kind == "binary":
            with open(path, "wb") as f:
                f.write(b"\0" + content.encode())
        elif kind in ("pdf", "scan", "badpdf"):
            data = {"pdf": sample_pdf(1), "scan": image_only_pdf_bytes(1), "badpdf": truncated(sample_pdf(1))}[kind]
            with open(path + ".pdf", "wb") as f:
                f.write(data)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "link-up":
            os.symlink(root, path)  # back to the root: a loop (absolute: a relative "../.." through an
            # earlier link to the root would resolve above it and walk the whole of /tmp)
        elif kind == "link-dir":
            os.symlink(os.path.join(root, target), path)
        elif kind == "link-file":
            os.symlink(os.path.join(root, texts[pick % len(texts)]) if texts else "nowhere", path)
        elif kind == "link-self":
            os.symlink(path, path)
        elif kind == "link-dangling":
            os.symlink(os.path.join(root, "gone", name), path)
    return texts


def plainly_reachable(root: str, rel: str) -> bool:
    """No hidden or locked component and no symlink on the way: any correct walk must read this file."""
    parts = rel.split(os.sep)
    if any(p.startswith((".", LOCKED)) for p in parts):
        return False
    return not any(os.path.islink(os.path.join(root, *parts[: i + 1])) for i in range(len(parts)))


def real_path(shown: str) -> str:
    """Undo the input layer's escaping of undecodable name bytes (no generated name has a backslash)."""
    return re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(0xDC00 + int(m.group(1), 16)), shown)


def check(entries) -> None:
    real_open, real_scandir = open, os.scandir

    def locked_open(path, *args, **kwargs):
        if os.path.basename(os.fspath(path)).startswith(LOCKED):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    def locked_scandir(path="."):
        if os.path.basename(os.path.normpath(os.fspath(path))).startswith(LOCKED):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "root")
        os.mkdir(root)
        texts = build(root, entries)
        must_read = {os.path.realpath(os.path.join(root, rel)) for rel in texts if plainly_reachable(root, rel)}
        report = InputReport()
        with mock.patch.object(inputs, "open", locked_open, create=True), \
                mock.patch.object(inputs.os, "scandir", locked_scandir), per_example_timeout(20):
            try:
                segments = list(iter_segments([root], report=report))
            except InputError as exc:
                assert "\n" not in str(exc) and root in str(exc)
                assert not must_read, f"{must_read} not read: {report.skipped}"
                segments = None
            total_bytes_estimate([root])

        read = [real_path(p) for p in report.files_read]
        assert len(read) == len(set(read)), "a path was read twice"
        for path in read:
            rel = os.path.relpath(path, root)
            assert not rel.startswith("..") and not any(p.startswith(".") for p in rel.split(os.sep)), path
        assert must_read <= {os.path.realpath(p) for p in read}, f"missed: {must_read}; skipped {report.skipped}"
        for path, reason in report.skipped:
            assert reason.startswith(REASONS), (path, reason)
        if segments is not None:  # one header per file read, in the same order
            headers = [s.source for s in segments if s.text == FILE_HEADER.format(path=s.source)]
            assert report.chars_emitted > 0 and headers == report.files_read
            "".join(s.text for s in segments).encode("utf-8")  # printable, hashable, tokenizable


def test_fuzz_walk_quick():
    fuzz_for("walk-quick", TREES, check, examples=QUICK_EXAMPLES)


@pytest.mark.slow
@pytest.mark.fuzz
def test_fuzz_walk():
    fuzz_for("walk", TREES, check)
