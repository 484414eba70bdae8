"""engine/bench: grids, passkey samples and scoring, the retention stream, and full attention as a sanity check."""
import math

import pytest
import torch

from engine.bench import passkey as pk
from engine.bench import retention as rt
from engine.bench.grid import parse_choices, parse_count, parse_counts, parse_depths
from engine.bench.text import Noise, Prose, word_start
from engine.config import CacheConfig
from engine.errors import ConfigError
from tests.cli.fakes import ByteTokenizer
from tests.engine.tiny import tiny_model

PROSE = ("It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, his chin "
         "nuzzled into his breast in an effort to escape the vile wind, slipped quickly through the glass doors. ")


@pytest.fixture
def prose(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_text(PROSE * 40)
    return Prose(ByteTokenizer(), path)


# ------------------------------------------------------------------------------------------------------ grids


def test_counts_accept_suffixes_and_multiples_of_the_cache():
    assert parse_count("512", "--gaps") == 512
    assert parse_count("2k", "--lengths") == 2048
    assert parse_count("1.5K", "--lengths") == 1536
    assert parse_count("0.5x", "--gaps", unit=512) == 256
    assert parse_counts("8k, 2k,2k,512", "--lengths") == [512, 2048, 8192]
    assert parse_counts("0.5x,1x,4096", "--gaps", unit=1024) == [512, 1024, 4096]


@pytest.mark.parametrize("text, unit, needle", [
    ("abc", None, "not a token count"), ("-5", None, ">= 0"), ("2x", None, "relative to the cache size"),
    ("", None, "is empty"), ("nan", None, ">= 0"),
])
def test_bad_counts_name_the_flag(text, unit, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        parse_counts(text, "--gaps", unit=unit)
    assert "--gaps" in str(e.value)


def test_depths_and_policies():
    assert parse_depths("0.9,0.1,0.5") == [0.1, 0.5, 0.9]
    for bad in ("0", "1", "1.5", "-0.1", "x"):
        with pytest.raises(ConfigError, match="--depths"):
            parse_depths(bad)
    assert parse_choices("sink, Cascade,sink", "--policy") == ["sink", "cascade"]
    with pytest.raises(ConfigError, match="'dense' is not one of full, sink, cascade"):
        parse_choices("full,dense", "--policy")


# ---------------------------------------------------------------------------------------------------- passkey


@pytest.mark.parametrize("filler", ["noise", "prose"])
@pytest.mark.parametrize("length, depth", [(600, 0.1), (1000, 0.5), (3000, 0.9), (2000, 0.33)])
@pytest.mark.parametrize("prompt", ["first", "last"])
def test_sample_holds_the_key_at_the_requested_depth(filler, length, depth, prompt, prose):
    tok = ByteTokenizer()
    source = Noise(tok) if filler == "noise" else prose
    s = pk.make_sample(tok, source, length, depth, 0, prompt, seed=7)
    assert s.n_tokens == length
    needle = tok.encode(pk.NEEDLE.format(key=s.key))
    assert s.doc_ids[s.needle_at : s.needle_at + len(needle)] == needle
    n_filler = len(s.doc_ids) - len(needle)
    assert abs(s.needle_at - depth * n_filler) <= 0.01 * length  # within ±1% of the length
    assert tok.decode(s.doc_ids).count(s.key) == 2  # stated twice in the needle, nowhere else
    assert len(s.key) == 5 and s.key.isdigit()
    text = tok.decode(s.prefix_ids + s.suffix_ids)
    assert pk.QUESTION in text and text.endswith(pk.ANSWER_START)
    assert (s.question_span is not None) == (prompt == "first")
    if prompt == "first":
        a, b = s.question_span
        assert tok.decode(s.prefix_ids[a:b]).strip() == pk.QUESTION


def test_samples_are_deterministic_and_shared_by_both_prompt_orders(prose):
    tok = ByteTokenizer()
    a = pk.make_sample(tok, prose, 1500, 0.5, 3, "first", seed=1)
    b = pk.make_sample(tok, prose, 1500, 0.5, 3, "first", seed=1)
    last = pk.make_sample(tok, prose, 1500, 0.5, 3, "last", seed=1)
    assert a == b
    assert last.key == a.key and last.doc_ids[:200] == a.doc_ids[:200]  # same key, same filler from the same offset
    keys = {pk.make_sample(tok, prose, 1500, 0.5, i, "last", seed=1).key for i in range(8)}
    assert len(keys) > 4  # other samples, other keys


def test_insertion_point_is_a_word_start():
    tok = ByteTokenizer()
    ids = tok.encode("abcdef ghijkl mnopqr")
    assert word_start(tok, ids, 9) == 6 and ids[6] == ord(" ")
    assert word_start(tok, ids, 3, reach=2) == 3  # nothing near: unchanged


def test_a_length_too_short_for_the_prompt_is_a_usage_error():
    with pytest.raises(ConfigError, match=r"--lengths: 100 tokens cannot hold the prompt .* at least \d+"):
        pk.make_sample(ByteTokenizer(), Noise(ByteTokenizer()), 100, 0.5, 0, "last", seed=0)


@pytest.mark.parametrize("text, parsed, exact, digits", [
    ("71432.", "71432", True, 1.0),
    ("The key is 71432 and more", "71432", True, 1.0),
    ("71482", "71482", False, 0.8),
    ("714320", "714320", False, 1.0),  # a longer run is not the key, though its first 5 digits match
    ("1. then 71432", "71432", True, 1.0),  # the first run of at least 5 digits
    ("7143", "7143", False, 0.8),  # no 5-digit run: the first run, compared as far as it goes
    ("no digits at all", None, False, 0.0),
    ("", None, False, 0.0),
])
def test_score_answer(text, parsed, exact, digits):
    assert pk.score_answer("71432", text) == (parsed, exact, pytest.approx(digits))


def test_summary_averages_each_cell():
    def result(policy, depth, exact, digits):
        return pk.PasskeyResult(policy, "last", 1024, depth, 0, "12345", "", None, exact, digits, 0, 1024, 0.0)

    cells = pk.summarize([result("sink", 0.5, True, 1.0), result("sink", 0.5, False, 0.4),
                          result("cascade", 0.5, True, 1.0)])
    assert cells[0] == {"policy": "sink", "prompt": "last", "length": 1024, "depth": 0.5, "samples": 2,
                        "exact": 0.5, "digits": pytest.approx(0.7)}
    assert cells[1]["policy"] == "cascade" and cells[1]["exact"] == 1.0


@pytest.mark.parametrize("prompt", ["first", "last"])
def test_cascade_without_eviction_answers_like_full(prompt):
    tok, model = ByteTokenizer(), tiny_model(max_positions=2048)
    s = pk.make_sample(tok, Noise(tok), 700, 0.5, 0, prompt, seed=0)
    done = []
    runs = {}
    for policy in ("full", "cascade"):
        config = CacheConfig(policy=policy, cache_size=1024, cascades=4, sinks=8, stride=64)
        assert pk.check_sample(config, s, 2048, 6, pk.is_guided(config, s, 0.0)) is None
        runs[policy] = pk.run_sample(model, tok, config, s, max_tokens=6, question_weight=0.0,
                                     on_chunk=done.append)
    assert runs["full"].answer == runs["cascade"].answer
    r = runs["cascade"]
    assert (r.tokens, r.length, r.key, r.prompt) == (700, 700, s.key, prompt)
    assert r.needle_position == len(s.prefix_ids) + s.needle_at
    assert done[-1] == len(s.doc_ids)  # progress counts the document's tokens


def test_full_fits_only_within_the_model_positions():
    tok = ByteTokenizer()
    s = pk.make_sample(tok, Noise(tok), 1000, 0.5, 0, "last", seed=0)
    assert pk.fits_full(s, 12, 1012) and not pk.fits_full(s, 12, 1011)


# -------------------------------------------------------------------------------------------------- retention


def test_second_copy_sits_at_the_requested_gap(prose):
    vocab = rt.vocabulary(ByteTokenizer(), 256)
    s = rt.make_sample(prose, vocab, 900, 48, "random", seed=3, sample=1)
    assert len(s.lead_ids) == rt.LEAD and len(s.gap_ids) == 900 and len(s.segment_ids) == 48
    for gap in (0, 17, 512, 900):
        stream = s.stream(gap)
        first, second = s.first_copy(), s.second_copy(gap)
        assert stream[first : first + 48] == s.segment_ids
        assert stream[second:] == s.segment_ids
        assert second - (first + 48) == gap  # prose tokens between the end of one copy and the start of the next
        assert s.positions(gap) == len(stream)
    assert s == rt.make_sample(prose, vocab, 900, 48, "random", seed=3, sample=1)
    assert s.segment_ids != rt.make_sample(prose, vocab, 900, 48, "random", seed=3, sample=2).segment_ids
    spans = rt.make_sample(prose, vocab, 900, 48, "prose", seed=3, sample=1)
    assert bytes(spans.segment_ids).decode() in PROSE * 3


def test_random_segments_avoid_special_tokens():
    class Tok(ByteTokenizer):
        all_special_ids = [0, 1]
        added_tokens_decoder = {255: "<extra>"}

        def __len__(self):
            return 256

    vocab = rt.vocabulary(Tok(), 300)
    assert vocab == list(range(2, 255))


def _dense_nll(model, stream: list[int], start: int, n: int) -> float:
    """Mean NLL of stream[start+1 : start+n] from the model's own dense forward (transformers, sdpa)."""
    with torch.inference_mode():
        logits = model(torch.tensor([stream])).logits[0].float()
    logp = torch.log_softmax(logits[start : start + n - 1], dim=-1)
    targets = torch.tensor(stream[start + 1 : start + n])
    return float(-logp.gather(1, targets[:, None]).mean())


def test_full_attention_copy_nll_equals_a_dense_forward(prose):
    model = tiny_model(max_positions=512)
    s = rt.make_sample(prose, rt.vocabulary(ByteTokenizer(), 256), 150, 24, "random", seed=0, sample=0, lead=40)
    gaps = [0, 37, 150]
    fed = []
    run = rt.run_sample(model, CacheConfig(policy="full", stride=16), s, gaps, on_tokens=fed.append)
    assert run.baseline == pytest.approx(_dense_nll(model, s.stream(0), s.first_copy(), 24), abs=1e-4)
    for gap in gaps:
        assert run.nll[gap] == pytest.approx(_dense_nll(model, s.stream(gap), s.second_copy(gap), 24), abs=1e-4)
    assert run.tokens == sum(fed) == 40 + 24 + 150 + 24 * len(gaps)


def test_sink_holding_everything_matches_full(prose):
    model = tiny_model(max_positions=512)
    s = rt.make_sample(prose, rt.vocabulary(ByteTokenizer(), 256), 100, 16, "random", seed=0, sample=0, lead=32)
    full = rt.run_sample(model, CacheConfig(policy="full", stride=16), s, [10, 100])
    sink = rt.run_sample(model, CacheConfig(policy="sink", cache_size=256, sinks=4, stride=16), s, [100, 10])
    assert sink.baseline == pytest.approx(full.baseline, abs=1e-4)
    assert sink.nll == pytest.approx(full.nll, abs=1e-4)
    rows = rt.summarize([full, sink])
    assert [r["policy"] for r in rows] == ["full", "sink"]
    assert rows[1]["nll"][100] == pytest.approx(sink.nll[100]) and math.isfinite(rows[1]["baseline"])
