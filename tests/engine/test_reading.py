"""Prompt framing, incremental decoding, room checks, answering and the retention report on tiny models."""
from types import SimpleNamespace

import pytest
import torch

from engine.config import CacheConfig
from engine.errors import CapacityError, ConfigError
from engine.generate import generate
from engine.prompt import build_prompt, chat_frame
from engine.retention_report import SourceMap, iter_mapped_token_ids, retention_report
from engine.runner import Runner
from engine.reading import TextStream, answer, check_room, ingest, stop_ids
from tests.cli.fakes import ByteTokenizer
from tests.engine.tiny import tiny_model


class ChatTokenizer(ByteTokenizer):
    """Bytes plus a ChatML-like template that trims content, as many templates do."""

    chat_template = "chatml"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<s>{m['role']}\n{m['content'].strip()}</s>\n" for m in messages)
        return text + ("<s>assistant\n" if add_generation_prompt else "")


def test_chat_frame_splits_the_template_around_the_content():
    assert chat_frame(ChatTokenizer()) == ("<s>user\n", "</s>\n<s>assistant\n")
    assert chat_frame(ByteTokenizer(), cue="Summary:") == ("", "\n\nSummary:\n")  # no template: plain text


def test_prompt_pins_the_question_before_the_input_and_asks_it_again():
    tok = ChatTokenizer()
    p = build_prompt(tok, "Answer it.", "Now answer.", "Who?")
    assert tok.decode(p.prefix_ids) == "<s>user\nAnswer it.\n\nQuestion: Who?\n\nDocument:\n"
    assert tok.decode(p.prefix_ids[p.question_span[0]:p.question_span[1]]) == " Who?"
    assert tok.decode(p.suffix_ids) == "\n\nNow answer.\n\nQuestion: Who?</s>\n<s>assistant\n"
    later = build_prompt(tok, "Read it.", "Now answer.", "Who?", question_first=False)
    assert later.question_span is None and "Who?" not in tok.decode(later.prefix_ids)
    assert later.suffix_ids == p.suffix_ids


def test_text_stream_waits_for_whole_characters():
    stream = TextStream(ByteTokenizer())
    out = [stream.push(b) for b in "aé€!".encode()]
    assert out == ["a", "", "é", "", "", "€", "!"]
    stream.push(0xE2)  # a truncated character at the end is flushed as a replacement character
    assert stream.flush() == "\ufffd"


def test_stop_ids_include_end_of_turn():
    tok = SimpleNamespace(eos_token_id=2, unk_token_id=0, convert_tokens_to_ids=lambda t: 7)
    assert stop_ids(tok) == {2, 7}
    assert stop_ids(ByteTokenizer()) == {0}


def test_check_room_names_the_flag():
    cascade = CacheConfig(cache_size=512, cascades=4, sinks=4, stride=64)
    assert check_room(cascade, 20, 8192, 30, 64) is None
    assert "`max_tokens`" in check_room(cascade, 20, 8192, 30, 200)  # request + answer > newest sub-cache
    with pytest.raises(CapacityError, match="`cache_size`"):
        check_room(cascade, 20, 590, 30, 64)
    with pytest.raises(CapacityError, match="question"):
        check_room(cascade, 20, 600, 30, 64, extra_positions=30)  # fits without the question
    full = CacheConfig(policy="full")
    assert check_room(full, 20, 8192, 30, 100, n_prefix_and_input=8000) is None
    with pytest.raises(CapacityError, match="`max_tokens`"):
        check_room(full, 20, 8192, 30, 200, n_prefix_and_input=8000)
    with pytest.raises(ConfigError, match="`max_tokens`"):
        check_room(cascade, 20, 8192, 30, 0)


def test_answer_is_the_greedy_continuation_after_the_request():
    model = tiny_model("llama", seed=5)
    tok = ByteTokenizer()
    g = torch.Generator().manual_seed(3)
    prefix, text, suffix = (torch.randint(1, 256, (n,), generator=g).tolist() for n in (10, 300, 40))
    config = CacheConfig(cache_size=64, cascades=2, sinks=4, stride=16)
    with Runner(model, config, n_sinks=len(prefix)) as runner:
        assert ingest(runner, prefix, [text[:100], text[100:]]) == 300
        got = "".join(answer(runner, tok, suffix, 30, stop={0}))
    with Runner(model, config, n_sinks=len(prefix)) as runner:  # the same steps by hand
        ingest(runner, prefix, [text])
        hidden = None
        for i in range(0, len(suffix), 16):
            hidden = runner.step(torch.tensor([suffix[i:i + 16]]))
        ids = list(generate(runner, runner.logits(hidden[:, -1])[0], 30, stop_ids={0}))
    assert got == tok.decode(ids).lstrip()


def test_source_map_and_report_count_every_kept_token():
    Seg = SimpleNamespace
    segments = [Seg(text="\n\n### File: a\n\n", source="a", page=None), Seg(text="x" * 300, source="a", page=None),
                Seg(text="\n\n### Page 1\n\n", source="b.pdf", page=1), Seg(text="y" * 200, source="b.pdf", page=1),
                Seg(text="z" * 100, source="b.pdf", page=2)]
    smap = SourceMap()
    pieces = list(iter_mapped_token_ids(ByteTokenizer(), segments, smap))
    n_input = sum(map(len, pieces))
    assert smap.starts == [0, 315, 529] and smap.labels == [("a", None), ("b.pdf", 1), ("b.pdf", 2)]
    prefix = [1] * 6
    model = tiny_model(max_positions=1024)
    for policy in ("full", "sink", "cascade"):
        config = CacheConfig(policy=policy, cache_size=128, cascades=4, sinks=4, stride=32)
        with Runner(model, config, n_sinks=len(prefix)) as runner:
            ingest(runner, prefix, pieces)
            rep = retention_report(runner.cache, len(prefix), n_input, smap)
        kept = n_input if policy == "full" else config.cache_size
        assert rep["kept_layer0"] == rep["kept_mean"] == kept
        assert sum(r["kept_mean"] for r in rep["by_tenth"]) == pytest.approx(kept)
        assert sum(r["kept_mean"] for r in rep["by_file"]) == pytest.approx(kept)
        assert [r["tokens"] for r in rep["by_file"]] == [315, n_input - 315]
        assert [(r["page"], r["tokens"]) for r in rep["by_page"]] == [(1, 214), (2, 100)]
        if policy == "sink":  # the window holds the last 128 tokens: page 2 and the end of page 1
            assert [r["kept_mean"] for r in rep["by_page"]] == [28, 100]
            assert rep["by_tenth"][-1]["kept_fraction"] == 1.0 and rep["by_tenth"][0]["kept_mean"] == 0
