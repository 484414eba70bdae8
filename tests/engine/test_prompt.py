"""The closing request of `ask` (engine/prompt.py): without passages it is build_prompt's suffix; with them,
the passages come first, weakest first, each on one line, and the question last."""
from engine.prompt import ASK_INSTRUCTION, ASK_REQUEST, PASSAGES_HEADER, build_prompt, closing_ids
from tests.cli.fakes import ByteTokenizer


def test_no_passages_is_the_plain_suffix():
    tok = ByteTokenizer()
    prompt = build_prompt(tok, ASK_INSTRUCTION, ASK_REQUEST, "Who?", question_first=True)
    assert closing_ids(tok, ASK_REQUEST, "Who?") == prompt.suffix_ids


def test_passages_come_before_the_question():
    tok = ByteTokenizer()
    text = tok.decode(closing_ids(tok, ASK_REQUEST, "Which code?", ["weak one", "the code is\n 48213"]))
    assert text.index(PASSAGES_HEADER) < text.index("- weak one") < text.index("- the code is 48213")
    assert text.index("- the code is 48213") < text.index(ASK_REQUEST) < text.index("Question: Which code?")
