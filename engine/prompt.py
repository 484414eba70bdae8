"""The pinned prefix and the closing request around a streamed input, built with the tokenizer's chat template.

The model never sees the whole input at once, so the chat template is never rendered over it. Instead the
template is rendered once on a user message whose content is a unique placeholder and split there:

    head = "<|im_start|>system ...<|im_end|>\\n<|im_start|>user\\n"      (whatever the template puts before)
    tail = "<|im_end|>\\n<|im_start|>assistant\\n"                       (whatever it puts after, incl. the cue)

    prefix = head + instruction [+ "\\n\\nQuestion: " + question] + "\\n\\nDocument:\\n"    -> pinned in the sinks
    input  = streamed after the prefix, chunk by chunk
    suffix = "\\n\\n" + request (or the question again) + tail                         -> appended after the input

This works for any chat template; a tokenizer without one gets plain text (an empty head, "\\n\\n<cue>\\n" as the
tail). Prefix and suffix are tokenized separately with add_special_tokens=False (the template text carries its
own special tokens, which the tokenizer recognises)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    """Token ids around the input; `question_span` = [start, end) of the question's tokens in `prefix_ids`."""

    prefix_ids: list[int]
    suffix_ids: list[int]
    question_span: tuple[int, int] | None = None


def chat_frame(tokenizer, cue: str = "Answer:") -> tuple[str, str]:
    """(head, tail): the chat template's text before and after a user message's content.

    Plain text ("", "\\n\\n" + cue + "\\n") when the tokenizer has no chat template or the template misbehaves."""
    plain = ("", f"\n\n{cue}\n")
    if not getattr(tokenizer, "chat_template", None):
        return plain
    marker = f"CASCADECTLCONTENT{uuid.uuid4().hex}"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # a template that needs other roles or variables: plain text still works
        return plain
    if not isinstance(text, str) or text.count(marker) != 1:
        return plain
    head, tail = text.split(marker)
    return head, tail


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def build_prompt(
    tokenizer,
    instruction: str,
    request: str,
    question: str | None = None,
    question_first: bool = True,
    cue: str = "Answer:",
) -> Prompt:
    """Prefix and suffix ids for `summarize` (no question) or `ask` (the question after the input, and, with
    `question_first`, also in the pinned prefix before it). `request` closes the user turn after the input
    (for `ask` the question is appended to it). `cue` is only used without a chat template."""
    head, tail = chat_frame(tokenizer, cue)
    span = None
    if question is not None and question_first:
        before = _encode(tokenizer, f"{head}{instruction}\n\nQuestion:")
        asked = _encode(tokenizer, f" {question}")
        prefix = before + asked + _encode(tokenizer, "\n\nDocument:\n")
        span = (len(before), len(before) + len(asked))
    else:
        prefix = _encode(tokenizer, f"{head}{instruction}\n\nDocument:\n")
    closing = request if question is None else f"{request}\n\nQuestion: {question}"
    suffix = _encode(tokenizer, f"\n\n{closing}{tail}")
    return Prompt(prefix, suffix, span)


def quote_ids(tokenizer, passages: list[str]) -> list[int]:
    """The ids of `passages` quoted as a block, to go right before a closing request (whose ids start with its
    own blank line): the evidence the cache kept whole, weakest first so that the strongest is nearest the
    question. Each passage on one line."""
    if not passages:
        return []
    quoted = "\n".join(f"- {' '.join(text.split())}" for text in passages)
    return _encode(tokenizer, f"\n\n{PASSAGES_HEADER}\n{quoted}")


def summary_instruction(words: int | None = None, instruction: str | None = None) -> str:
    """The request for `summarize`: `instruction` as given, else a default; `words` adds a target length."""
    text = instruction.strip() if instruction else "Summarize the document."
    if words:
        text += f" Use about {words} words."
    return text


ASK_INSTRUCTION = "Answer the question using the document."  # the question follows in the prefix
ASK_INSTRUCTION_LATER = "Read the document, then answer the question that follows it."  # question only after
ASK_REQUEST = "Answer the question using the document above."
PASSAGES_HEADER = "Passages from the document:"
