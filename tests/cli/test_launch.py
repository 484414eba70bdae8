"""`--nproc N`: cascadectl's own launcher for `--each` (cascadectl/launch.py).

Three layers: the real CLI over 2 CPU processes (gloo) on a tiny random model saved to disk, compared with one
process; the options, checked in this process before anything starts (tiny fake model); and the supervisor on
its own, with stand-in workers (`python -c ...`) that print, fail, crash or wait for Ctrl-C, which is fast and
lets every exit path be provoked on purpose."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cascadectl import launch
from cascadectl.main import app
from tests.cli.fakes import use_fake_model
from bench.fixtures import SMALL, TEXTS, byte_model_dir, corpus, worker_env

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("file", "status", "error", "tokens", "scored_tokens", "nll_sum", "nll_sq_sum", "ppl", "ppl_err")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return byte_model_dir(tmp_path_factory.mktemp("model"))


def _cascadectl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cascadectl", *args], env=worker_env(), capture_output=True,
                          text=True, timeout=300)


def _in_process(*args: str):
    """One process, here, with the workers' thread count (so that every float is comparable)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ the real CLI


def test_two_processes_give_one_process_numbers_and_one_line_per_failure(tmp_path, model_dir):
    folder = corpus(tmp_path / "corpus", {"empty.txt": ""})
    args = ["ppl", str(folder), "--each", "--json", "--model", str(model_dir), "--device", "cpu", "--dtype",
            "fp32", *SMALL]
    one = _in_process(*args)
    two = _cascadectl(*args, "--nproc", "2")
    assert one.exit_code == 1 and two.returncode == 1, two.stderr  # empty.txt fails in both
    solo, pair = json.loads(one.stdout), json.loads(two.stdout)  # rank 0's stdout only: one JSON document
    assert pair["world_size"] == 2 and {r["rank"] for r in pair["files"]} == {0, 1}
    assert [[r.get(k) for k in KEYS] for r in pair["files"]] == [[r.get(k) for k in KEYS] for r in solo["files"]]
    assert pair["total"]["ppl"] == solo["total"]["ppl"] and pair["total"]["failed"] == 1
    lines = two.stderr.splitlines()
    assert "Traceback" not in two.stderr and "torch.distributed" not in two.stderr
    reason = f"{folder / 'empty.txt'}: failed: no text in the input"
    assert sum(reason in line for line in lines) == 1  # the failing file's rank says it once
    assert sum(line.startswith("error:") for line in lines) == 1, two.stderr  # rank 0's summary, not one per rank
    assert "1 of 4 files failed" in two.stderr
    for name in TEXTS:  # one progress line per file, each from the rank that read it
        assert sum(str(folder / name) in line and "PPL" in line for line in lines) == 1


def test_summarize_each_over_two_processes_writes_every_summary_and_the_index_once(tmp_path, model_dir):
    folder = corpus(tmp_path / "corpus")
    out = tmp_path / "summaries"
    done = _cascadectl("summarize", str(folder), "--each", "--out", str(out), "--model", str(model_dir),
                       "--device", "cpu", "--dtype", "fp32", *SMALL, "--max-tokens", "4", "--nproc", "2")
    assert done.returncode == 0, done.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted([n + ".summary.md" for n in TEXTS] + ["index.json"])  # no temp files, no doubles
    index = json.loads((out / "index.json").read_text())
    assert index["world_size"] == 2 and index["total"]["written"] == len(TEXTS)
    assert sorted(r["file"] for r in index["files"]) == sorted(str(folder / n) for n in TEXTS)
    assert {r["rank"] for r in index["files"]} == {0, 1}
    assert sorted(done.stdout.splitlines()) == sorted(f"{folder / n}\tok\t{out / n}.summary.md" for n in TEXTS)
    assert done.stderr.count("index in") == 1 and "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------ the options


@pytest.fixture
def no_launch(monkeypatch):
    """The fake model in this process; any attempt to start workers fails the test."""
    use_fake_model(monkeypatch)

    def refuse(*a, **k):
        raise AssertionError("workers were started")

    monkeypatch.setattr(launch, "supervise", refuse)


@pytest.mark.parametrize("command", [["ppl"], ["summarize"]])
def test_nproc_without_each_is_a_usage_error(tmp_path, no_launch, command):
    source = corpus(tmp_path / "corpus") / "a.txt"
    result = CliRunner().invoke(app, [*command, str(source), *SMALL, "--nproc", "2"])
    assert result.exit_code == 2, result.output
    assert "--nproc" in result.stderr and "--each" in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("args, says", [
    (["--nproc", "0"], "--nproc"),
    (["--nproc", "two"], "--nproc"),
    (["--nproc", "2", "--device-map", "auto"], "--device-map"),
    (["--nproc", "2", "--device", "cuda:1"], "--device"),
    (["--nproc", "2", "--compare", "sink,cascade"], "--compare"),
    (["--nproc", "2", "missing-folder"], "missing-folder"),
])
def test_bad_options_are_one_line_before_any_worker_starts(tmp_path, no_launch, args, says):
    folder = corpus(tmp_path / "corpus")
    result = CliRunner().invoke(app, ["ppl", str(folder), "--each", *SMALL, *args])
    assert result.exit_code in (1, 2), result.output  # a missing path is a runtime failure, the rest usage
    assert says in result.stderr and len(result.stderr.splitlines()) == 1 and "Traceback" not in result.output


def test_summarize_out_is_checked_before_any_worker_starts(tmp_path, no_launch):
    folder = corpus(tmp_path / "corpus")
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(app, ["summarize", str(folder), "--each", "--out", str(tmp_path / "file"),
                                      *SMALL, "--nproc", "2"])
    assert result.exit_code == 2 and "--out" in result.stderr, result.output


def test_nproc_under_torchrun_is_refused(tmp_path, no_launch, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(app, ["ppl", str(corpus(tmp_path / "c")), "--each", *SMALL, "--nproc", "2"])
    assert result.exit_code == 2 and "torchrun" in result.stderr, result.output


def test_one_process_runs_here(tmp_path, no_launch):
    folder = corpus(tmp_path / "corpus")
    args = ["ppl", str(folder), "--each", "--device", "cpu", *SMALL, "--json"]
    plain = CliRunner().invoke(app, args)
    assert plain.exit_code == 0, plain.output
    for nproc in ("1", "auto"):  # auto: one per visible GPU, so 1 on a CPU
        here = CliRunner().invoke(app, [*args, "--nproc", nproc])
        assert here.exit_code == 0, here.output
        assert json.loads(here.stdout)["world_size"] == 1
        assert [[r.get(k) for k in KEYS] for r in json.loads(here.stdout)["files"]] == \
            [[r.get(k) for k in KEYS] for r in json.loads(plain.stdout)["files"]]


def _parsed(argv: list[str]) -> dict:
    """What the CLI makes of `argv` (a subcommand and its arguments), without running it."""
    import typer.main

    group = typer.main.get_command(app)
    command = group.commands[argv[0]]
    return command.make_context(argv[0], list(argv[1:])).params


def test_workers_get_the_same_arguments_and_torchrun_environment(tmp_path, monkeypatch):
    use_fake_model(monkeypatch)
    seen = {}

    def fake_supervise(commands, envs, out, err):
        seen.update(commands=commands, envs=envs)
        return 1

    monkeypatch.setattr(launch, "supervise", fake_supervise)
    folder = corpus(tmp_path / "corpus")
    given = ["ppl", str(folder), "-n", "64", "--stride=16", "--each", "--sinks", "4", "--nproc", "3", "--json", "-q",
             "--device", "cpu", "--beta", "0.99"]
    result = CliRunner().invoke(app, given)
    assert result.exit_code == 1, result.output  # the workers' status is the command's
    commands, envs = seen["commands"], seen["envs"]
    assert len(commands) == 3 and commands[0] == commands[2]
    assert commands[0][:3] == [sys.executable, "-m", "cascadectl"]
    argv = commands[0][3:]
    assert argv[0] == "ppl" and argv[-2:] == ["--", str(folder)] and not any("nproc" in a for a in argv)
    assert set(argv[1:-2]) == {"--cache-size=64", "--stride=16", "--sinks=4", "--each", "--json", "--quiet",
                               "--device=cpu", "--beta=0.99"}
    assert _parsed(argv) == {**_parsed(given), "nproc": None}  # the same command, minus --nproc
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [("0", "0", "3"), ("1", "1", "3"),
                                                                            ("2", "2", "3")]
    assert {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"} and len({e["MASTER_PORT"] for e in envs}) == 1


def test_summarize_workers_keep_values_that_look_like_options(tmp_path, monkeypatch):
    use_fake_model(monkeypatch)
    seen = {}
    monkeypatch.setattr(launch, "supervise", lambda commands, envs, out, err: seen.update(argv=commands[0][3:]))
    folder = corpus(tmp_path / "corpus")
    given = ["summarize", str(folder), "--each", "--out", str(tmp_path / "s"), "--instruction", "-be brief-",
             "--max-tokens", "4", "--nproc", "2"]
    assert CliRunner().invoke(app, given).exit_code == 0
    assert "--instruction=-be brief-" in seen["argv"]
    assert _parsed(seen["argv"]) == {**_parsed(given), "nproc": None}


# ------------------------------------------------------------------------------------------------ the supervisor


class Capture:
    """A text stream that remembers what was written; `on_write` may act on it (e.g. press Ctrl-C)."""

    def __init__(self, on_write=None) -> None:
        self.text, self.on_write = "", on_write

    def write(self, text: str) -> int:
        self.text += text
        if self.on_write:
            self.on_write(self.text)
        return len(text)

    def flush(self) -> None:
        pass


def _workers(*codes: str) -> tuple[list[list[str]], list[dict[str, str]]]:
    """One stand-in worker per code snippet; `rank` is defined in each."""
    commands = [[sys.executable, "-c", f"rank = {r}\n" + textwrap.dedent(code)] for r, code in enumerate(codes)]
    return commands, [dict(os.environ)] * len(codes)


def _supervise(*codes: str, on_write=None, grace: float = launch.GRACE_S) -> tuple[int, str, str]:
    out, err = Capture(), Capture(on_write)
    code = launch.supervise(*_workers(*codes), out, err, grace=grace)
    return code, out.text, err.text


CHATTY = """
    import sys
    print(f"report of rank {rank}")
    for line in ["loading the model", f"rank {rank}: (1/1) doc.txt: PPL 9", f"warning: rank {rank}: x.txt: failed: no",
                 "error: 1 of 2 files failed"]:
        print(line, file=sys.stderr)
    sys.exit(1)
"""


def test_rank0_stdout_and_each_ranks_own_lines_are_shown_once():
    code, out, err = _supervise(CHATTY, CHATTY)
    assert code == 1  # rank 0's status: a file failed
    assert out == "report of rank 0\n"  # the other ranks' stdout is not ours to print
    # whole lines; rank 1's notices and its copy of the error are held back (rank 0 already said it)
    assert sorted(err.splitlines()) == sorted([
        "loading the model", "error: 1 of 2 files failed",
        "rank 0: (1/1) doc.txt: PPL 9", "warning: rank 0: x.txt: failed: no",
        "rank 1: (1/1) doc.txt: PPL 9", "warning: rank 1: x.txt: failed: no"])


def test_a_crash_stops_the_others_and_is_one_line():
    waits = "import time\ntime.sleep(120)\n"
    crashes = "import sys\nprint('loading', file=sys.stderr)\nraise RuntimeError('boom in the kernel')\n"
    code, _, err = _supervise(waits, crashes)
    assert code == 1  # no traceback shown, and rank 0 (asleep, as if blocked on rank 1) was stopped
    assert err == "error: rank 1 crashed with exit status 1: RuntimeError: boom in the kernel; stopped the other 1 " \
                  "process\n"


def test_a_worker_killed_by_a_signal_is_named():
    waits = "import time\ntime.sleep(120)\n"
    killed = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    code, _, err = _supervise(waits, killed)
    assert code == 1 and err == "error: rank 1 was killed by SIGKILL (exit status 137); stopped the other 1 process\n"


def test_a_rank_that_fails_alone_is_explained_and_the_waiting_ones_stopped():
    waits = "import time\ntime.sleep(120)\n"  # rank 0, blocked on a peer that is gone
    refuses = "import sys\nprint('error: 2 processes on this host need as many GPUs, but 1 are visible', " \
              "file=sys.stderr)\nsys.exit(2)\n"
    code, _, err = _supervise(waits, refuses, grace=0.5)
    assert code == 2
    assert err == "error: rank 1: 2 processes on this host need as many GPUs, but 1 are visible\n"


def test_ctrl_c_is_forwarded_once_and_exits_130():
    waits = """
        import signal, sys, time
        hits = []
        def stop(*_):
            hits.append(1)
        signal.signal(signal.SIGINT, stop)
        print(f"rank {rank}: ready", file=sys.stderr, flush=True)
        while not hits:
            time.sleep(0.01)
        time.sleep(0.3)  # a second SIGINT would be counted here
        print(f"rank {rank}: {len(hits)} interrupt(s)", file=sys.stderr)
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    """
    sent = []

    def press_ctrl_c(text: str) -> None:
        if text.count(": ready") == 2 and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # lands in the supervisor's handler (main thread)

    code, _, err = _supervise(waits, waits, on_write=press_ctrl_c)
    assert code == 130
    assert "rank 0: 1 interrupt(s)" in err and "rank 1: 1 interrupt(s)" in err
    assert err.count("error: interrupted") == 1


# ------------------------------------------------------------------------------------------------ a worker's exit


class _Exited(Exception):
    pass


@pytest.mark.parametrize("outcome, code", [(None, 0), (SystemExit(1), 1), (SystemExit(None), 0),
                                           (SystemExit(130), 130), (SystemExit("usage text"), 1)])
def test_a_worker_leaves_through_os_exit_with_its_status(monkeypatch, outcome, code):
    """A rank ends with os._exit after flushing, so that gloo's threads cannot abort the interpreter's shutdown
    after the results are written (seen as 'terminate called without an active exception' and SIGABRT, which the
    launcher then had to call a crash: 1 run in 52 under load)."""
    from cascadectl import main

    def command():
        if outcome is not None:
            raise outcome

    exits = []

    def fake_exit(status):
        exits.append(status)
        raise _Exited

    monkeypatch.setattr(main, "app", command)
    monkeypatch.setattr(main.os, "_exit", fake_exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(_Exited):
        main.run()
    assert exits == [code]
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: the normal exit, through SystemExit
    if isinstance(outcome, SystemExit):
        with pytest.raises(SystemExit):
            main.run()
    else:
        main.run()
    assert exits == [code]
