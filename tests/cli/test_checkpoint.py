"""`--checkpoint`/`--resume` on ppl, summarize and ask: Ctrl-C lands between chunks, resuming gives exactly the
uninterrupted result, and checkpoints from another model, other settings or a changed input are refused."""
import json
import os
import random
import signal
import stat
import time

import pytest
import torch

from cascadectl.commands import ppl as ppl_command
import engine.batch_answer as batch_answer
from engine import snapshot
from engine.batch_answer import AnswerBatch
from engine.checkpoint import Checkpoint
from engine.runner import Runner
from tests.cli.fakes import fake_lm, invoke

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 10
SMALL = ["--cache-size", "64", "--stride", "32", "--sinks", "4", "--cascades", "4"]  # ~28 chunks of 32 tokens
VARIED = " ".join(random.Random(0).choice(TEXT.split() + ["Bingley", "Netherfield", "ball", "Darcy", "proud"])
                  for _ in range(160))  # less repetitive: the question's guidance changes what is kept
GEN = ["--cache-size", "192", "--cascades", "2", "--max-tokens", "8"]  # room for the request in sub-cache 0


pytestmark = pytest.mark.usefixtures("tiny")  # the tiny fake model for every command (tests/conftest.py)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    return str(path)



def ctrl_c_after(monkeypatch, n_steps: int, times: int = 1) -> None:
    """Send SIGINT to ourselves (`times` times) during model step number `n_steps` (a real Ctrl-C, mid-chunk)."""
    step = Runner.step
    calls = [0]

    def counting(self, ids):
        calls[0] += 1
        if calls[0] == n_steps:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return step(self, ids)

    monkeypatch.setattr(Runner, "step", counting)


def numbers(doc: dict) -> list:
    return [(r["ppl"], r["ppl_err"], r["nll_per_token"], r["bits_per_byte"], r["tokens"], r["scored_tokens"])
            for r in doc["results"]]


@pytest.mark.parametrize("policy", ["cascade", "sink", "full"])
def test_ppl_interrupted_and_resumed_equals_uninterrupted(tmp_path, text_file, monkeypatch, policy):
    args = ["ppl", text_file, *SMALL, "--policy", policy, "--json"]
    expected = json.loads(invoke(args).stdout)
    ckpt = str(tmp_path / "run.ckpt")
    with monkeypatch.context() as m:
        ctrl_c_after(m, 5)
        stopped = invoke([*args, "--checkpoint", ckpt])
    assert stopped.exit_code == 130, stopped.output
    assert stopped.stdout == "" and "PPL so far" in stopped.stderr and "--resume" in stopped.stderr
    assert "Traceback" not in stopped.output
    extra = snapshot.read_snapshot(ckpt)[0]["extra"]
    assert extra["tokens_done"] == 5 * 32  # the chunk in flight was finished, then saved
    resumed = invoke([*args, "--checkpoint", ckpt, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert numbers(json.loads(resumed.stdout)) == numbers(expected)
    assert not os.path.exists(ckpt)  # removed once the run completed


def test_ppl_periodic_checkpoints_and_resume_from_the_last(tmp_path, text_file, monkeypatch):
    args = ["ppl", text_file, *SMALL, "--json"]
    expected = json.loads(invoke(args).stdout)
    ckpt = str(tmp_path / "run.ckpt")

    def die(*a, **k):
        raise RuntimeError("machine lost")  # e.g. killed: no chance to save on the way out

    with monkeypatch.context() as m:
        real_save = Checkpoint.save
        saves = []

        def save_then_die(self, *a, **k):
            size = real_save(self, *a, **k)
            saves.append(self.saved_at)
            if len(saves) == 3:
                m.setattr(Runner, "step", die)
            return size

        m.setattr(Checkpoint, "save", save_then_die)
        crashed = invoke([*args, "--checkpoint", ckpt, "--checkpoint-every", "70"])
    assert crashed.exit_code != 0 and saves == [96, 192, 288]  # every 70 tokens, rounded up to whole chunks
    resumed = invoke([*args, "--checkpoint", ckpt, "--resume", "--checkpoint-every", "70"])
    assert resumed.exit_code == 0, resumed.output
    assert numbers(json.loads(resumed.stdout)) == numbers(expected)


def test_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, text_file, monkeypatch):
    ckpt = str(tmp_path / "run.ckpt")
    with monkeypatch.context() as m:
        ctrl_c_after(m, 3)
        assert invoke(["ppl", text_file, *SMALL, "--checkpoint", ckpt]).exit_code == 130
    before = open(ckpt, "rb").read()
    with monkeypatch.context() as m:
        ctrl_c_after(m, 2, times=2)  # resumed, then two Ctrl-C in one chunk: no time to save
        result = invoke(["ppl", text_file, *SMALL, "--checkpoint", ckpt, "--resume"])
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert open(ckpt, "rb").read() == before
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_interrupt_during_the_save_leaves_the_previous_checkpoint(tmp_path, text_file, monkeypatch):
    ckpt = str(tmp_path / "run.ckpt")
    assert invoke(["ppl", text_file, *SMALL, "--checkpoint", ckpt, "--checkpoint-every", "64"],
                  ).exit_code == 0 and not os.path.exists(ckpt)
    with monkeypatch.context() as m:
        saves = [0]
        real_fsync = os.fsync

        def fsync(fd):
            saves[0] += stat.S_ISREG(os.fstat(fd).st_mode)  # the file's fsync, not its directory's
            if saves[0] == 2:  # Ctrl-C while the second checkpoint is being written
                raise KeyboardInterrupt
            return real_fsync(fd)

        m.setattr(snapshot.os, "fsync", fsync)
        result = invoke(["ppl", text_file, *SMALL, "--checkpoint", ckpt, "--checkpoint-every", "64"])
    assert result.exit_code == 130
    assert snapshot.read_snapshot(ckpt)[0]["extra"]["tokens_done"] == 64  # the first one, whole
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_ctrl_c_without_checkpoint_still_lands_between_chunks(text_file, monkeypatch):
    ctrl_c_after(monkeypatch, 4)
    result = invoke(["ppl", text_file, *SMALL])
    assert result.exit_code == 130 and "after 128 tokens" in result.stderr and result.stdout == ""


# ---------------------------------------------------------------------------------------------------- refusals


def interrupted(tmp_path, args, monkeypatch, name="run.ckpt") -> str:
    ckpt = str(tmp_path / name)
    with monkeypatch.context() as m:
        ctrl_c_after(m, 6)
        assert invoke([*args, "--checkpoint", ckpt]).exit_code == 130
    return ckpt


def refused(args, code: int, needle: str) -> None:
    result = invoke(args)
    assert result.exit_code == code, result.output
    assert needle in result.stderr and "Traceback" not in result.output, result.stderr
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1


def test_resume_refusals(tmp_path, text_file, monkeypatch):
    ckpt = interrupted(tmp_path, ["ppl", text_file, *SMALL], monkeypatch)
    again = ["ppl", text_file, "--checkpoint", ckpt, "--resume"]
    refused([*again, *SMALL[:2], "--stride", "16", *SMALL[4:]], 2, "--stride 32")
    refused([*again, *SMALL, "--policy", "sink"], 2, "--policy cascade")
    refused(["ppl", text_file, *SMALL, "--checkpoint", ckpt], 2, "already exists")
    refused(["ppl", text_file, *SMALL, "--resume"], 2, "--resume needs --checkpoint")
    refused(["ppl", text_file, *SMALL, "--checkpoint", str(tmp_path / "none"), "--resume"], 1, "no checkpoint")
    refused(["ppl", text_file, *SMALL, "--compare", "sink,cascade", "--checkpoint", str(tmp_path / "x")], 2,
            "--compare")
    refused(["ppl", text_file, *SMALL, "--checkpoint", str(tmp_path / "no" / "x")], 2, "does not exist")
    refused(["ppl", text_file, *SMALL, "--checkpoint", str(tmp_path / "x"), "--checkpoint-every", "0"], 2,
            "--checkpoint-every")
    changed = tmp_path / "b.txt"
    changed.write_text("It is a truth" + TEXT[13:].replace("good", "bad", 1))
    refused(["ppl", str(changed), *SMALL, "--checkpoint", ckpt, "--resume"], 1, "input changed")
    short = tmp_path / "c.txt"
    short.write_text(TEXT[:100])
    refused(["ppl", str(short), *SMALL, "--checkpoint", ckpt, "--resume"], 1, "input changed")
    monkeypatch.setattr(ppl_command, "load_model", lambda *a, **k: other_model())
    refused([*again, *SMALL], 2, "--model")
    assert os.path.exists(ckpt)  # refusals never touch the checkpoint


def other_model():
    from dataclasses import replace

    return replace(fake_lm(), model_id="other", model_hash="1" * 64)


def test_checkpoint_of_another_command_or_prompt(tmp_path, text_file, monkeypatch):
    ckpt = interrupted(tmp_path, ["summarize", text_file, *SMALL, *GEN], monkeypatch)
    refused(["ppl", text_file, *SMALL, "--checkpoint", ckpt, "--resume"], 2, "checkpoint of `summarize`")
    refused(["summarize", text_file, *SMALL, *GEN, "--words", "20", "--checkpoint", ckpt, "--resume"], 2,
            "another instruction")
    ckpt = interrupted(tmp_path, ["ask", text_file, "Who?", *SMALL, *GEN], monkeypatch, "ask.ckpt")
    refused(["ask", text_file, "What?", *SMALL, *GEN, "--checkpoint", ckpt, "--resume"], 2, "question")


# ------------------------------------------------------------------------------------------------ summarize, ask


def same_cache(a: str, b: str) -> bool:
    """The two --save-cache files hold bit-identical tensors."""
    ta, tb = snapshot.read_snapshot(a)[2], snapshot.read_snapshot(b)[2]
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("command", [
    ["summarize", "{file}"],
    ["ask", "{file}", "Who is he?", "--question-first"],  # guided: the question's queries are in the checkpoint
    ["ask", "{file}", "Who is he?", "--question-first", "--evidence", "32"],  # and the evidence store's state
    ["ask", "{file}", "-q", "Who?", "-q", "What?"],
    ["ask", "{file}", "-q", "Who?", "-q", "What?", "--evidence", "64"],  # a store for each, probed again
])
def test_answers_after_resume_equal_uninterrupted(tmp_path, monkeypatch, command):
    """Same answers, same retention report and the very same cache (compared through --save-cache)."""
    varied = tmp_path / "v.txt"
    varied.write_text(VARIED)
    args = [a.replace("{file}", str(varied)) for a in command] + SMALL + GEN + ["--json"]
    expected = json.loads(invoke([*args, "--save-cache", str(tmp_path / "expected.kv")]).stdout)
    ckpt = interrupted(tmp_path, args, monkeypatch)
    resumed = invoke([*args, "--checkpoint", ckpt, "--resume", "--save-cache", str(tmp_path / "resumed.kv")])
    assert resumed.exit_code == 0, resumed.output
    doc = json.loads(resumed.stdout)
    key = "answers" if "answers" in expected else "answer"
    assert doc[key] == expected[key] and doc["retention"] == expected["retention"]
    if "--evidence" in command:
        assert expected["record"]["settings"]["evidence"] > 0 and doc["evidence"] == expected["evidence"]
    assert doc["stats"]["tokens"] == expected["stats"]["tokens"] > 6 * 32
    assert same_cache(str(tmp_path / "expected.kv"), str(tmp_path / "resumed.kv"))
    assert not os.path.exists(ckpt)


def on_decode_step(m, path: str, n: int, action) -> None:
    """Run `action` on the n-th decode step of the answer: the frozen cache's batch step (the default), or the
    evicting cache's one-token `Runner.step` (forced by a frozen copy that does not fit in memory)."""
    count = [0]
    if path == "frozen":
        decode = AnswerBatch.decode

        def counted(self, tokens, active):
            count[0] += 1
            if count[0] == n:
                action()
            return decode(self, tokens, active)
        m.setattr(AnswerBatch, "decode", counted)
        return
    step = Runner.step
    m.setattr(batch_answer, "free_bytes", lambda device: 0)

    def counted_step(self, ids):  # one-token steps are decode steps here (910 % stride != 1)
        count[0] += ids.shape[1] == 1
        if count[0] == n and ids.shape[1] == 1:
            action()
        return step(self, ids)
    m.setattr(Runner, "step", counted_step)


@pytest.mark.parametrize("path", ["frozen", "evicting"])
def test_ctrl_c_while_answering_resumes_straight_to_the_answer(tmp_path, text_file, monkeypatch, path):
    """The whole ingest is checkpointed before answering: a resume reads nothing and answers the same."""
    args = ["summarize", text_file, *SMALL, *GEN, "--json"]
    with monkeypatch.context() as m:
        if path == "evicting":
            m.setattr(batch_answer, "free_bytes", lambda device: 0)
        expected = json.loads(invoke(args).stdout)
    assert expected["record"]["generation"]["batch"] is (path == "frozen")
    ckpt = str(tmp_path / "s.ckpt")
    with monkeypatch.context() as m:  # no chunk boundary to wait for: Ctrl-C acts at once
        on_decode_step(m, path, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
        stopped = invoke([*args, "--checkpoint", ckpt])
    assert stopped.exit_code == 130 and stopped.stdout == "", stopped.stderr[-2000:]
    assert snapshot.read_snapshot(ckpt)[0]["extra"]["tokens_done"] == len(TEXT)
    with monkeypatch.context() as m:
        if path == "evicting":
            m.setattr(batch_answer, "free_bytes", lambda device: 0)
        resumed = invoke([*args, "--checkpoint", ckpt, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["answer"] == expected["answer"]


def test_interrupted_summarize_prints_partial_stats(tmp_path, text_file, monkeypatch):
    ckpt = str(tmp_path / "s.ckpt")
    ctrl_c_after(monkeypatch, 6)
    result = invoke(["summarize", text_file, *SMALL, *GEN, "--checkpoint", ckpt])
    assert result.exit_code == 130 and result.stdout == ""
    assert "read " in result.stderr and "--resume" in result.stderr and os.path.exists(ckpt)


# Python reports the KeyboardInterrupt raised inside the finaliser as "ignored": that is the situation under test
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("path", ["frozen", "evicting"])
def test_ctrl_c_caught_by_a_finaliser_still_stops_the_answer(text_file, monkeypatch, path):
    """A Ctrl-C handled while a finaliser runs (the garbage collector's, torch's) raises inside it, and Python
    reports that KeyboardInterrupt as "ignored"; the answer loop must still stop, at the next token, with 130."""
    class SignalsInItsFinaliser:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, inside __del__, and its exception is swallowed

    on_decode_step(monkeypatch, path, 2, SignalsInItsFinaliser)  # dropped at once: __del__ runs now
    result = invoke(["summarize", text_file, *SMALL, *GEN, "--json"])
    assert result.exit_code == 130 and result.stdout == ""
