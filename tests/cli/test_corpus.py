"""`--each`: per-file results over a folder, failures reported without losing the others, sharding, torchrun.

Most tests run one process with the tiny fake model; `test_two_gloo_processes_match_one` starts a real
2-process torchrun (gloo) on a tiny random model saved to disk and compares it with a 1-process run."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import distributed as dist_helpers
from engine.errors import CascadeError
from tests.cli.fakes import invoke
from bench.fixtures import SMALL, TEXTS, byte_model_dir, corpus

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("tiny")  # the tiny fake model for every command (tests/conftest.py)



def _single(path: Path) -> dict:
    result = invoke(["ppl", str(path), *SMALL, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["results"][0]


def test_rows_equal_single_file_runs_and_total_is_token_weighted(tmp_path):
    folder = corpus(tmp_path / "corpus")
    result = invoke(["ppl", str(folder), "--each", *SMALL, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    rows = doc["files"]
    assert [r["file"] for r in rows] == [str(folder / n) for n in ("a.txt", "b.md", "sub/c.txt")]  # name order
    for row in rows:
        alone = _single(Path(row["file"]))
        assert row["status"] == "ok" and row["rank"] == 0
        assert (row["ppl"], row["nll_per_token"], row["tokens"]) == (alone["ppl"], alone["nll_per_token"],
                                                                     alone["tokens"])
    total = doc["total"]
    nll = sum(r["nll_sum"] for r in rows) / sum(r["scored_tokens"] for r in rows)
    assert total["ppl"] == pytest.approx(math.exp(nll), rel=1e-12)
    assert total["scored_tokens"] == sum(r["scored_tokens"] for r in rows) and total["failed"] == 0
    assert doc["world_size"] == 1 and {"settings", "model", "versions"} <= set(doc)
    # the table: a row per file on stdout, the llama.cpp-style line for the total, progress per file on stderr
    table = invoke(["ppl", str(folder), "--each", *SMALL])
    assert table.exit_code == 0, table.output
    assert f"Final estimate: PPL = {total['ppl']:.4f}" in table.stdout
    assert all(str(folder / n) in table.stdout for n in TEXTS)
    assert all(str(folder / n) in table.stderr for n in TEXTS) and "tok/s" in table.stderr


def test_a_failing_file_is_reported_and_the_others_complete(tmp_path):
    folder = corpus(tmp_path / "corpus", {"empty.txt": "", "one.txt": "x"})
    (folder / ".hidden").write_text("not read")
    (folder / "blob.bin").write_bytes(b"\0\1\2" * 100)
    result = invoke(["ppl", str(folder), "--each", *SMALL, "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    status = {Path(r["file"]).name: r for r in doc["files"]}
    assert status["empty.txt"]["status"] == "failed" and "no text" in status["empty.txt"]["error"]
    assert status["one.txt"]["status"] == "failed" and "at least two" in status["one.txt"]["error"]
    assert all(status[Path(n).name]["status"] == "ok" for n in TEXTS)
    assert doc["total"]["files"] == 3 and doc["total"]["failed"] == 2
    assert {Path(p).name: why for p, why in doc["skipped"]} == {".hidden": "hidden", "blob.bin": "binary"}
    assert "2 of 5 files failed" in result.stderr and "Traceback" not in result.output
    table = invoke(["ppl", str(folder), "--each", *SMALL])
    assert table.exit_code == 1
    assert "failed: " + str(folder / "empty.txt") in table.stdout and "Final estimate" in table.stdout


@pytest.mark.parametrize("args, flag", [
    (["--compare", "sink,cascade"], "--compare"),
    (["-"], "stdin"),
    (["--checkpoint", "x.ckpt"], "--checkpoint"),
])
def test_each_refuses_what_it_cannot_do(tmp_path, args, flag):
    folder = corpus(tmp_path / "corpus")
    result = invoke(["ppl", str(folder), "--each", *SMALL, *args], input="some text")
    assert result.exit_code == 2, result.output
    assert flag in result.stderr and "Traceback" not in result.output


def test_summaries_mirror_the_tree_with_an_index(tmp_path):
    folder = corpus(tmp_path / "corpus", {"empty.txt": ""})
    out = folder / "summaries"  # inside the input folder: never read back as input
    args = ["summarize", str(folder), "--each", "--out", str(out), *SMALL, "--max-tokens", "8"]
    result = invoke(args)
    assert result.exit_code == 1, result.output  # empty.txt failed, the others were written
    assert all((out / (name + ".summary.md")).is_file() for name in TEXTS)
    alone = invoke(["summarize", str(folder / "sub/c.txt"), *SMALL, "--max-tokens", "8", "--json"])
    assert (out / "sub/c.txt.summary.md").read_text() == json.loads(alone.stdout)["answer"].strip() + "\n"
    index = json.loads((out / "index.json").read_text())
    assert index["total"] == {**index["total"], "written": 3, "failed": 1, "kept": 0}
    assert {r["file"]: r["status"] for r in index["files"]}[str(folder / "empty.txt")] == "failed"
    assert not list(out.rglob("*.tmp")) and not (out / "summaries").exists()
    assert f"{folder / 'a.txt'}\tok\t{out / 'a.txt.summary.md'}" in result.stdout
    # a second run keeps what is there with --skip-existing
    before = (out / "a.txt.summary.md").stat().st_mtime_ns
    again = invoke([*args, "--skip-existing", "--json"])
    assert json.loads(again.stdout)["total"]["kept"] == 3
    assert (out / "a.txt.summary.md").stat().st_mtime_ns == before


@pytest.mark.parametrize("args, flag", [
    (["--each"], "--out"),
    (["--out", "x"], "--each"),
    (["--each", "--out", "x", "--report"], "--report"),
    (["--each", "--out", "x", "--save-cache", "y.kv"], "--skip-existing"),
])
def test_summarize_each_options_go_together(tmp_path, args, flag):
    folder = corpus(tmp_path / "corpus")
    result = invoke(["summarize", str(folder), *SMALL, *args])
    assert result.exit_code == 2, result.output
    assert flag in result.stderr and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------ distribution


@pytest.mark.parametrize("sizes, n", [([10, 9, 8, 1, 1], 2), ([5] * 7, 3), ([100, 1, 1, 1], 4), ([3, 2], 5), ([], 2)])
def test_shard_by_size_is_a_deterministic_balanced_partition(sizes, n):
    shards = dist_helpers.shard_by_size(sizes, n)
    assert len(shards) == n and sorted(i for s in shards for i in s) == list(range(len(sizes)))
    assert shards == dist_helpers.shard_by_size(sizes, n)
    loads = [sum(sizes[i] for i in s) for s in shards]
    # greedy LPT: no rank carries more than the best split's load plus one file
    assert max(loads, default=0) <= max(sum(sizes) / n, max(sizes, default=0)) + max(sizes, default=0)
    assert all(s == sorted(s) for s in shards)


def test_shard_by_size_example():
    assert dist_helpers.shard_by_size([10, 9, 8, 1, 1], 2) == [[0, 3, 4], [1, 2]]  # 12 and 17 bytes


def test_one_process_world_needs_no_process_group():
    world = dist_helpers.world_from_env({})
    assert (world.rank, world.size, world.distributed) == (0, 1, False)
    with dist_helpers.process_group(world, torch.device("cpu")):
        assert dist_helpers.gather_to_main({"x": 1}, world) == [{"x": 1}]
        assert dist_helpers.all_reduce_sums([1, 2.5], world, torch.device("cpu")) == [1.0, 2.5]
        with pytest.raises(CascadeError, match="boom"):
            dist_helpers.agree(CascadeError("boom"), world)
    assert dist_helpers.world_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}).local_rank == 0
    with pytest.raises(CascadeError, match="RANK"):
        dist_helpers.world_from_env({"WORLD_SIZE": "2", "RANK": "5"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one(tmp_path):
    """torchrun, 2 CPU processes (gloo): the same per-file numbers as one process, gathered on rank 0."""
    model = byte_model_dir(tmp_path / "model")
    folder = corpus(tmp_path / "corpus", {"empty.txt": ""})
    args = ["ppl", str(folder), "--each", "--json", "--model", str(model), "--device", "cpu", "--dtype", "fp32",
            *SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, "-m", "cascadectl", *args], env=env, capture_output=True, text=True,
                         timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "cascadectl", *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 1, one.stderr  # empty.txt fails in both
    assert two.returncode == 1, two.stderr  # torchrun passes the failure on (after its own error summary)
    solo, pair = json.loads(one.stdout), json.loads(two.stdout)  # only rank 0 prints
    assert pair["world_size"] == 2 and {r["rank"] for r in pair["files"]} == {0, 1}
    keys = ("file", "status", "tokens", "scored_tokens", "nll_sum", "ppl")
    assert [[r.get(k) for k in keys] for r in pair["files"]] == [[r.get(k) for k in keys] for r in solo["files"]]
    assert pair["total"]["ppl"] == solo["total"]["ppl"]
    stderr = " ".join(two.stderr.split())  # progress lines wrap at 80 columns in a pipe
    assert "rank 1: " in stderr and "empty.txt: failed: no text" in stderr and "terminate called" not in stderr
