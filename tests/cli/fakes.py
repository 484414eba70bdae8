"""A byte-level tokenizer and a tiny random model standing in for the embedded one in CLI tests."""
from __future__ import annotations

import torch

from engine.models import LoadedModel
from tests.engine.tiny import tiny_model


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256); id 0 doubles as end-of-sequence."""

    eos_token_id = 0
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", "replace")

    def convert_tokens_to_ids(self, token: str):
        return None


def fake_lm(max_positions: int = 8192) -> LoadedModel:
    model = tiny_model("llama", max_positions=max_positions)
    return LoadedModel(model=model, tokenizer=ByteTokenizer(), model_id="tiny-llama (test)", model_hash="0" * 64,
                       family="llama", max_positions=max_positions, device=torch.device("cpu"),
                       dtype=torch.float32)


def use_fake_model(monkeypatch) -> None:
    """Every command loads `fake_lm()` instead of a real model (for the duration of one test)."""
    from cascadectl.commands import ask, ppl, summarize

    for module in (ppl, summarize, ask):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: fake_lm())


def invoke(args, **kw):
    """The CLI in-process through typer's CliRunner (stdout and stderr kept apart), as every CLI test calls it."""
    from typer.testing import CliRunner

    from cascadectl.main import app

    return CliRunner().invoke(app, args, **kw)
