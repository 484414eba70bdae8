"""Quoted passages (engine/prompt.py quote_ids, engine/evidence.py quoted_closing): the block comes right before
the closing request, weakest first, one passage a line; nothing is quoted when nothing was evicted."""
import torch

from engine.config import CacheConfig
from engine.evidence import EvidenceSelector, kept_spans, quoted_closing
from engine.prompt import ASK_INSTRUCTION, ASK_REQUEST, PASSAGES_HEADER, build_prompt, quote_ids
from engine.retention import QuestionGuide
from engine.runner import Runner
from engine.reading import ingest
from tests.cli.fakes import ByteTokenizer
from tests.engine.tiny import tiny_model


def test_quote_block():
    tok = ByteTokenizer()
    assert quote_ids(tok, []) == []
    text = tok.decode(quote_ids(tok, ["weak one", "the code is\n 48213"]))
    assert text == f"\n\n{PASSAGES_HEADER}\n- weak one\n- the code is 48213"


def _read(n_tokens: int):
    model = tiny_model(seed=4, max_positions=2048)
    tok = ByteTokenizer()
    prompt = build_prompt(tok, ASK_INSTRUCTION, ASK_REQUEST, "Which code?", question_first=True)
    body = torch.randint(32, 127, (n_tokens,), generator=torch.Generator().manual_seed(6)).tolist()
    config = CacheConfig(cache_size=576, cascades=2, sinks=4, stride=32, evidence=64)
    runner = Runner(model, config, n_sinks=len(prompt.prefix_ids))
    guide = QuestionGuide(runner, prompt.question_span, 1.0)
    with runner, guide, EvidenceSelector(runner, guide, {0: 1.0, 1: 1.0}, len(prompt.prefix_ids)):
        ingest(runner, prompt.prefix_ids, [body])
    return runner.cache, tok, prompt


def test_quoted_closing_puts_the_strongest_last():
    cache, tok, prompt = _read(2000)
    ids, n = quoted_closing(cache, tok, prompt.suffix_ids, most=8, max_tokens=6)
    spans = kept_spans(cache)
    assert n == len(spans) == 2 and ids[-len(prompt.suffix_ids):] == prompt.suffix_ids
    text = tok.decode(ids)
    texts = [tok.decode(list(s.ids)) for s in spans]
    assert text.index(" ".join(texts[1].split())) < text.index(" ".join(texts[0].split())) < text.index(ASK_REQUEST)
    few, n_few = quoted_closing(cache, tok, prompt.suffix_ids, most=8, max_tokens=256 - len(ids) + 20)
    assert n_few == 1  # the weakest is dropped first when the newest sub-cache has no room for both
    assert quoted_closing(cache, tok, prompt.suffix_ids, most=0, max_tokens=6) == (prompt.suffix_ids, 0)


def test_nothing_quoted_when_nothing_was_evicted():
    cache, tok, prompt = _read(300)
    assert cache.n_evidence == 0
    assert quoted_closing(cache, tok, prompt.suffix_ids, most=8, max_tokens=6) == (prompt.suffix_ids, 0)
