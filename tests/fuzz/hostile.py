"""Hostile inputs and fast stand-in models, shared by the bad-input suite and the fuzz targets.

Everything here is generated on the spot (nothing is downloaded): PDFs that are images only, truncated or have a
broken cross-reference table; byte-level mutations of valid files; a word-hashing tokenizer and a one-layer model
that keep CLI runs over megabytes of text fast; and `write_tiny_model` (bench/fixtures.py, which the memory bench
shares), a random-weight llama saved as safetensors with a word-level tokenizer, so that a real
`cascadectl ... --model DIR` subprocess can run in seconds.
"""
from __future__ import annotations

import re
import zlib

import torch

from bench.fixtures import assemble, pdf_bytes, tiny_model, write_tiny_model  # noqa: F401 - re-exported
from engine.models import LoadedModel

# --- PDFs --------------------------------------------------------------------------------------------------------


def image_only_pdf_bytes(n_pages: int = 2) -> bytes:
    """A PDF whose pages each paint one 2x2 grey image and carry no text at all: a "scan" before OCR."""
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]  # the page tree is filled in below
    pixels = bytes([0, 255, 255, 0])
    image_id = 3
    objects.append(b"<< /Type /XObject /Subtype /Image /Width 2 /Height 2 /ColorSpace /DeviceGray "
                   b"/BitsPerComponent 8 /Length %d >>\nstream\n" % len(pixels) + pixels + b"\nendstream")
    kids = []
    for _ in range(n_pages):
        page_id, content_id = len(objects) + 1, len(objects) + 2
        kids.append(page_id)
        draw = b"q 200 0 0 200 72 500 cm /Im0 Do Q\n"
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                       b"/Resources << /XObject << /Im0 %d 0 R >> >> /Contents %d 0 R >>" % (image_id, content_id))
        objects.append(b"<< /Length %d >>\nstream\n" % len(draw) + draw + b"endstream")
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), n_pages)
    return assemble(objects)


def broken_xref(data: bytes) -> bytes:
    """The same PDF with every xref offset and `startxref` pointing at the wrong byte (a classic broken export)."""
    data = re.sub(rb"\d{10} 00000 n", lambda m: b"%010d 00000 n" % (int(m.group()[:10]) + 7), data)
    return re.sub(rb"startxref\n\d+", b"startxref\n12", data)


def gutted_pdf(data: bytes) -> bytes:
    """Broken xref AND every object header destroyed, so that no reader can recover the page tree."""
    return broken_xref(data).replace(b" 0 obj", b" 0 jbo")


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def sample_pdf(pages: int = 3) -> bytes:
    return pdf_bytes([f"Page {i} says something worth reading, number {i}." for i in range(1, pages + 1)])


# --- fast in-process model -----------------------------------------------------------------------------------------


class WordHashTokenizer:
    """One token per whitespace-separated word (ids 1..255 by CRC32), so that megabytes make few tokens.

    Word pieces longer than `max_chars` are split, so that a line without spaces still makes tokens. Id 0 is EOS.
    """

    eos_token_id = 0
    chat_template = None

    def __init__(self, max_chars: int = 256) -> None:
        self.max_chars = max_chars

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        for word in text.split():
            for start in range(0, len(word), self.max_chars):
                ids.append(zlib.crc32(word[start : start + self.max_chars].encode("utf-8", "replace")) % 255 + 1)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(f"w{int(i)}" for i in ids)

    def convert_tokens_to_ids(self, token: str):
        return None


def fast_lm(max_chars: int = 256, max_positions: int = 8192) -> LoadedModel:
    """A one-layer random llama with `WordHashTokenizer`: the CLI's real code paths at ~20K tokens/s on one core."""
    model = tiny_model("llama", max_positions=max_positions, num_hidden_layers=1, hidden_size=32,
                       num_attention_heads=2, num_key_value_heads=1, intermediate_size=32, head_dim=16)
    return LoadedModel(model=model, tokenizer=WordHashTokenizer(max_chars), model_id="one-layer llama (test)",
                       model_hash="1" * 64, family="llama", max_positions=max_positions,
                       device=torch.device("cpu"), dtype=torch.float32)
