"""engine/bench/ruler.py: RULER-style samples (exact length, every fact, the right question), containment scoring,
summaries, and a run through the passkey reading path; the cascade+evidence policy name (engine/bench/grid.py)."""
import re

import pytest

from engine.bench import passkey as pk
from engine.bench import ruler
from engine.bench.grid import BENCH_POLICIES, EVIDENCE_POLICY, parse_choices, policy_config, policy_name
from engine.bench.text import Noise, Prose
from engine.config import CacheConfig
from engine.errors import ConfigError
from tests.cli.fakes import ByteTokenizer
from tests.engine.tiny import tiny_model

PROSE = ("It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, his chin "
         "nuzzled into his breast in an effort to escape the vile wind, slipped quickly through the glass doors. ")
TASKS = tuple(ruler.TASKS)


@pytest.fixture
def prose(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_text(PROSE * 40)
    return Prose(ByteTokenizer(), path)


# ---------------------------------------------------------------------------------------------------- samples


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("filler", ["noise", "prose"])
@pytest.mark.parametrize("length", [700, 1500, 4000])
@pytest.mark.parametrize("prompt", ["first", "last"])
def test_sample_has_the_length_and_every_fact(task, filler, length, prompt, prose):
    tok = ByteTokenizer()
    s = ruler.make_sample(tok, Noise(tok) if filler == "noise" else prose, task, length, 0, prompt, seed=5)
    assert s.n_tokens == length
    n_facts = {"multikey": ruler.KEYS, "multivalue": ruler.VALUES, "vartrack": ruler.HOPS + 1}[task]
    assert len(s.statements) == len(s.fact_at) == len(s.fact_len) == n_facts
    end = 0
    for text, at, n in zip(s.statements, s.fact_at, s.fact_len):
        assert s.doc_ids[at : at + n] == tok.encode(" " + text)
        assert at >= end  # in document order, never overlapping
        end = at + n
    doc = tok.decode(s.doc_ids)
    for e in s.expected:  # a variable is named where it is assigned and where the next one copies it
        assert doc.count(e) == (2 if task == "vartrack" and e != s.expected[-1] else 1), e
    assert doc.count(s.query) == (1 if task == "vartrack" else n_facts if task == "multivalue" else 1)
    assert (s.question_span is not None) == (prompt == "first")
    asked = tok.decode(s.suffix_ids)
    if prompt == "first":
        a, b = s.question_span
        assert tok.decode(s.prefix_ids[a:b]).strip() in asked


def _question(s) -> str:
    return re.search(r"Question: (.*)\n", ByteTokenizer().decode(s.suffix_ids)).group(1)


def test_multikey_asks_for_one_of_its_keys():
    tok = ByteTokenizer()
    s = ruler.make_sample(tok, Noise(tok), "multikey", 1200, 3, "first", seed=1)
    words = [re.match(r"The special magic number for (\w+) is (\d{5})\.$", t).groups() for t in s.statements]
    assert len({w for w, _ in words}) == len({n for _, n in words}) == ruler.KEYS  # distinct keys and numbers
    assert _question(s) == f"What is the special magic number for {s.query}?"
    assert s.expected == (dict(words)[s.query],)
    assert tok.decode(s.suffix_ids).endswith(f"The special magic number for {s.query} is ")


def test_multivalue_asks_for_every_value():
    tok = ByteTokenizer()
    s = ruler.make_sample(tok, Noise(tok), "multivalue", 1200, 0, "last", seed=2)
    values = [re.match(rf"One of the special magic numbers for {s.query} is (\d{{5}})\.$", t).group(1)
              for t in s.statements]
    assert sorted(values) == sorted(s.expected) and len(set(values)) == ruler.VALUES
    assert _question(s) == f"What are all the special magic numbers for {s.query}?"


def test_vartrack_is_one_chain_in_document_order():
    tok = ByteTokenizer()
    s = ruler.make_sample(tok, Noise(tok), "vartrack", 1200, 1, "first", seed=3)
    first, *hops = s.statements
    assert first == f"VAR {s.expected[0]} = {s.query}."
    assert hops == [f"VAR {b} = VAR {a}." for a, b in zip(s.expected, s.expected[1:])]
    assert len(set(s.expected)) == ruler.HOPS + 1
    assert all(re.fullmatch(f"[{ruler.CONSONANTS}]{{4}}", n) for n in s.expected)
    assert _question(s) == f"Which variables are assigned the value {s.query}?"


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_from_the_seed(task, prose):
    tok = ByteTokenizer()
    a = ruler.make_sample(tok, prose, task, 1500, 2, "first", seed=4)
    assert a == ruler.make_sample(tok, prose, task, 1500, 2, "first", seed=4)
    last = ruler.make_sample(tok, prose, task, 1500, 2, "last", seed=4)
    assert (last.statements, last.expected, last.query) == (a.statements, a.expected, a.query)
    head = min(a.fact_at[0], last.fact_at[0])
    assert head > 0 and last.doc_ids[:head] == a.doc_ids[:head]  # the filler from the same offset
    assert all(abs(x - y) <= 0.05 * 1500 for x, y in zip(last.fact_at, a.fact_at))  # the same depths
    longer = ruler.make_sample(tok, prose, task, 3000, 2, "first", seed=4)
    assert (longer.statements, longer.expected) == (a.statements, a.expected)  # every length: the same facts
    others = {ruler.make_sample(tok, prose, task, 1500, i, "first", seed=4).expected for i in range(6)}
    others |= {ruler.make_sample(tok, prose, task, 1500, 2, "first", seed=s).expected for s in range(5, 8)}
    assert len(others) == 9  # another sample or seed: other facts


@pytest.mark.parametrize("task", TASKS)
def test_a_length_too_short_for_the_facts_is_a_usage_error(task):
    tok = ByteTokenizer()
    with pytest.raises(ConfigError, match=rf"--lengths: 300 tokens cannot hold the prompt and the \d+ facts of "
                                          rf"{task} \(sample 0\); use lengths of at least (\d+)") as e:
        ruler.make_sample(tok, Noise(tok), task, 300, 0, "first", seed=0)
    need = int(re.search(r"at least (\d+)", str(e.value)).group(1))
    assert ruler.make_sample(tok, Noise(tok), task, need, 0, "first", seed=0).n_tokens == need


def test_unknown_task_and_prompt():
    with pytest.raises(ConfigError, match="--tasks: 'qa' is not one of multikey, multivalue, vartrack"):
        ruler.parse_tasks("multikey,qa")
    assert ruler.parse_tasks("vartrack, multikey,vartrack") == ["vartrack", "multikey"]
    with pytest.raises(ConfigError, match="--prompt"):
        ruler.make_sample(ByteTokenizer(), Noise(ByteTokenizer()), "multikey", 1000, 0, "middle", seed=0)


# ---------------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("expected, text, found, score", [
    (["48213"], "The number is 48213.", ["48213"], 1.0),
    (["48213"], "48123", [], 0.0),
    (["48213"], "", [], 0.0),
    (["48213"], "x482139", ["48213"], 1.0),  # containment, as RULER's string_match_all
    (["11111", "22222", "33333", "44444"], "22222, 44444 and 5", ["22222", "44444"], 0.5),
    (["11111", "22222", "33333", "44444"], "44444 33333 22222 11111", ["11111", "22222", "33333", "44444"], 1.0),
    (["QPWZ", "XKCD", "BRTM"], "VAR qpwz, VAR Xkcd", ["QPWZ", "XKCD"], 2 / 3),  # case-insensitive
])
def test_score_is_the_share_of_expected_strings_found(expected, text, found, score):
    got, share, exact = ruler.score_answer(expected, text)
    assert got == found and share == pytest.approx(score) and exact == (score == 1.0)


def _result(task, policy, score, exact, length=1024):
    return ruler.RulerResult(task, policy, "first", length, 0, "w", ["1"], "", [], score, exact, [0], length, 0.0)


def test_summary_per_cell_and_the_mean_over_tasks():
    cells = ruler.summarize([_result("multikey", "sink", 1.0, True), _result("multikey", "sink", 0.5, False),
                             _result("vartrack", "sink", 0.2, False), _result("multikey", "cascade", 1.0, True)])
    assert cells[0] == {"task": "multikey", "policy": "sink", "prompt": "first", "length": 1024, "samples": 2,
                        "score": 0.75, "exact": 0.5}
    assert [(c["task"], c["policy"]) for c in cells] == [("multikey", "sink"), ("vartrack", "sink"),
                                                         ("multikey", "cascade")]
    means = ruler.task_means(cells)
    assert means[0] == {"policy": "sink", "prompt": "first", "length": 1024, "tasks": ["multikey", "vartrack"],
                        "score": pytest.approx(0.475), "exact": 0.25}
    assert means[1]["policy"] == "cascade" and means[1]["score"] == 1.0


# ------------------------------------------------------------------------------------------------------- runs


@pytest.mark.parametrize("task", ["multikey", "vartrack"])
def test_cascade_without_eviction_answers_like_full(task):
    tok, model = ByteTokenizer(), tiny_model(max_positions=2048)
    s = ruler.make_sample(tok, Noise(tok), task, 800, 0, "first", seed=0)
    done, runs = [], {}
    for policy in ("full", "cascade"):
        config = CacheConfig(policy=policy, cache_size=1024, cascades=4, sinks=8, stride=64)
        runs[policy] = ruler.run_sample(model, tok, config, s, max_tokens=6, question_weight=0.0,
                                        on_chunk=done.append)
    assert runs["full"].answer == runs["cascade"].answer
    r = runs["cascade"]
    assert (r.task, r.policy, r.tokens, r.length, r.query, r.expected) == (task, "cascade", 800, 800, s.query,
                                                                          list(s.expected))
    assert r.fact_positions == [len(s.prefix_ids) + a for a in s.fact_at]
    assert r.score == len(r.found) / len(r.expected) and done[-1] == len(s.doc_ids)


def test_evidence_runs_through_the_passkey_path_and_is_named():
    tok, model = ByteTokenizer(), tiny_model(max_positions=2048)
    config = policy_config(EVIDENCE_POLICY, dict(cache_size=128, cascades=4, sinks=4, stride=64), 32)
    assert (config.policy, config.evidence, config.stride) == ("cascade", 32, 24)
    s = ruler.make_sample(tok, Noise(tok), "multivalue", 900, 0, "first", seed=0)
    r = ruler.run_sample(model, tok, config, s, question_weight=1.0, evidence_layers={0: 1.0, 1: 1.0})
    assert r.policy == EVIDENCE_POLICY and 0.0 <= r.score <= 1.0 and r.tokens == 900
    p = pk.make_sample(tok, Noise(tok), 900, 0.5, 0, "first", seed=0)
    assert pk.run_sample(model, tok, config, p, 4, evidence_layers={1: 1.0}).policy == EVIDENCE_POLICY


def test_policy_names_and_configs():
    assert parse_choices("sink,cascade+evidence", "--policy", BENCH_POLICIES) == ["sink", EVIDENCE_POLICY]
    with pytest.raises(ConfigError, match="'h2o' is not one of full, sink, cascade, cascade\\+evidence"):
        parse_choices("h2o", "--policy", BENCH_POLICIES)
    settings = dict(cache_size=512, cascades=4, sinks=64, stride=256)
    assert policy_name(policy_config("cascade", settings)) == "cascade"
    assert policy_name(policy_config("full", settings)) == "full"
    assert policy_name(policy_config(EVIDENCE_POLICY, settings, 64)) == EVIDENCE_POLICY
    with pytest.raises(ConfigError, match="needs --evidence >= 1"):
        policy_config(EVIDENCE_POLICY, settings, 0)
    with pytest.raises(ConfigError, match="`evidence`"):
        policy_config(EVIDENCE_POLICY, settings, 600)
