"""`cascadectl bench passkey|retention` and `ppl --plot` on a tiny model; one --quick run on the embedded model."""
import json
import sys

import pytest

from cascadectl.commands import bench_passkey
from tests.cli.fakes import invoke

PNG = b"\x89PNG\r\n\x1a\n"
CACHE = ["--cache-size", "128", "--stride", "64", "--sinks", "4", "--cascades", "4"]
PASSKEY = ["bench", "passkey", "--lengths", "450,700", "--depths", "0.2,0.8", "--max-tokens", "6", *CACHE]
TEXT = "The morning was grey and the lane was quiet. Nobody came to the door of the old house that day. " * 60


@pytest.fixture
def prose(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_text(TEXT)
    return str(path)


def retention_args(prose):
    return ["bench", "retention", "--gaps", "0.5x,1x,300", "--segment-tokens", "16", "--text", prose, *CACHE]



def one_line_error(result, code, needle):
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_passkey_json_schema_and_table(tiny):
    result = invoke([*PASSKEY, "--depths", "0.5", "--prompt", "first,last", "--policy", "sink,cascade", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["bench"] == "passkey"
    s = doc["settings"]
    assert (s["lengths"], s["depths"], s["prompts"], s["policies"]) == ([450, 700], [0.5], ["first", "last"],
                                                                        ["sink", "cascade"])
    assert s["cache"]["cache_size"] == 128 and s["filler"] == "noise" and s["samples"] == 1
    assert len(doc["results"]) == 2 * 2 * 2  # lengths × prompts × policies
    for r in doc["results"]:
        assert set(r) >= {"policy", "prompt", "length", "depth", "sample", "key", "answer", "parsed", "exact",
                          "digits", "needle_position", "tokens", "seconds"}
        assert r["tokens"] == r["length"] and isinstance(r["exact"], bool) and 0 <= r["digits"] <= 1
    assert len(doc["summary"]) == 8 and doc["skipped"] == []
    assert {"id", "hash", "dtype", "device", "max_positions"} <= set(doc["model"]) and "versions" in doc
    # keys depend on the sample, not on the policy or the prompt order
    keys = {(r["length"], r["depth"]): r["key"] for r in doc["results"]}
    assert all(keys[(r["length"], r["depth"])] == r["key"] for r in doc["results"])
    assert "passkey, question first" in result.stderr and "passkey, question last" in result.stderr
    plain = invoke([*PASSKEY, "--policy", "sink", "--lengths", "450"])
    assert plain.exit_code == 0 and plain.stdout == "" and "exact key (per digit)" in plain.stderr


def test_passkey_skips_full_where_it_does_not_fit(tiny):
    tiny["n"] = 1024
    result = invoke([*PASSKEY, "--lengths", "450,1100", "--depths", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["skipped"] == [{"policy": "full", "length": 1100, "reason": "needs 1,106 positions, the model has "
                                                                           "1,024"}]
    ran = {(r["policy"], r["length"]) for r in doc["results"]}
    assert ran == {("full", 450), ("sink", 450), ("cascade", 450), ("sink", 1100), ("cascade", 1100)}
    assert "note: full skipped at 1,100 tokens" in result.stderr


def test_passkey_with_prose_and_plot(tiny, prose, tmp_path):
    out = tmp_path / "passkey.png"
    result = invoke([*PASSKEY, "--lengths", "450", "--filler", "prose", "--text", prose, "--policy", "full,cascade",
                     "--samples", "2",
                     "--plot", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and result.stderr == ""
    assert out.read_bytes().startswith(PNG)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_retention_json_schema_and_plot(tiny, prose, tmp_path):
    out = tmp_path / "retention.png"
    result = invoke([*retention_args(prose), "--samples", "2", "--json", "--plot", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["bench"] == "retention" and doc["settings"]["gaps"] == [64, 128, 300]
    assert doc["settings"]["segment"] == "random" and doc["settings"]["segment_tokens"] == 16
    assert [r["policy"] for r in doc["summary"]] == ["full", "sink", "cascade"]
    for row in doc["summary"]:
        assert row["samples"] == 2 and row["baseline"] > 0
        assert [g["gap"] for g in row["gaps"]] == [64, 128, 300]
        assert [g["relative"] for g in row["gaps"]] == [0.5, 1.0, 300 / 128]
    assert len(doc["runs"]) == 6 and doc["skipped"] == []
    assert out.read_bytes().startswith(PNG)
    assert "retention: mean NLL" in result.stderr and "no copy" in result.stderr


def test_retention_stops_full_at_the_model_positions(tiny, prose):
    tiny["n"] = 512  # lead 256 + 2 × 16 + gap: 300 does not fit
    result = invoke([*retention_args(prose), "--segment", "prose", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    full = next(r for r in doc["summary"] if r["policy"] == "full")
    assert [g["gap"] for g in full["gaps"]] == [64, 128]
    assert [(k["policy"], k["gap"]) for k in doc["skipped"]] == [("full", 300)]
    assert "note: full skipped at gaps 300" in result.stderr


@pytest.mark.parametrize("args, code, needle", [
    (["bench", "passkey", "--policy", "sink,dense"], 2, "--policy: 'dense' is not one of full, sink, cascade"),
    (["bench", "passkey", "--depths", "0.5,1.2"], 2, "--depths: every depth must be strictly between 0 and 1"),
    (["bench", "passkey", "--depths", "0"], 2, "--depths"),
    (["bench", "passkey", "--lengths", "100"], 2, "--lengths: 100 tokens cannot hold the prompt"),
    (["bench", "passkey", "--lengths", "2q"], 2, "--lengths: '2q' is not a token count"),
    (["bench", "passkey", "--prompt", "middle"], 2, "--prompt: 'middle' is not one of first, last"),
    (["bench", "passkey", "--filler", "lorem"], 2, "--filler must be noise or prose"),
    (["bench", "passkey", "--samples", "0"], 2, "--samples must be >= 1"),
    (["bench", "passkey", "--cache-size", "510"], 2, "--cache-size (510) must be a multiple of --cascades (4)"),
    (["bench", "passkey", "--filler", "prose", "--text", "/nonexistent/book.txt"], 1, "cannot read"),
    (["bench", "passkey", "--plot", "/nonexistent/dir/p.png"], 1, "does not exist"),
    (["bench", "retention", "--gaps", "1x,-2"], 2, "--gaps"),
    (["bench", "retention", "--policy", "h2o"], 2, "--policy: 'h2o' is not one of"),
    (["bench", "retention", "--segment", "zeros"], 2, "--segment must be random or prose"),
    (["bench", "retention", "--segment-tokens", "1"], 2, "--segment-tokens must be >= 2"),
])
def test_bad_options_exit_with_one_line(tiny, args, code, needle):
    one_line_error(invoke(args), code, needle)


def test_quick_shrinks_only_the_grid_options_left_at_their_defaults(tiny, monkeypatch):
    seen = []
    real = bench_passkey.pk.make_sample
    monkeypatch.setattr(bench_passkey.pk, "make_sample", lambda *a, **k: seen.append(a[2:6]) or real(*a, **k))
    result = invoke(["bench", "passkey", "--quick", "--lengths", "450", "--policy", "sink", *CACHE])
    assert result.exit_code == 0, result.output
    assert seen == [(450, 0.5, 0, "last")]  # --lengths as given, the rest from --quick


def test_without_quick_the_default_grid_runs(tiny, monkeypatch):
    """Regression: the quick grid once replaced the defaults even without --quick."""
    seen = []
    real = bench_passkey.pk.make_sample
    monkeypatch.setattr(bench_passkey.pk, "make_sample", lambda *a, **k: seen.append(a[2:6]) or real(*a, **k))
    result = invoke(["bench", "passkey", "--lengths", "450", "--policy", "sink", *CACHE])
    assert result.exit_code == 0, result.output
    assert sorted(seen) == sorted((450, d, 0, p) for d in (0.1, 0.5, 0.9) for p in ("first", "last"))


def test_plot_without_matplotlib_says_how_to_install(tiny, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = invoke([*PASSKEY, "--plot", str(tmp_path / "p.png")])
    one_line_error(result, 1, "pip install 'cascadectl[plot]'")
    assert not (tmp_path / "p.png").exists()


def test_ppl_plot_draws_every_policy(tiny, tmp_path):
    src = tmp_path / "a.txt"
    src.write_text(TEXT[:2500])
    out = tmp_path / "nll.png"
    result = invoke(["ppl", str(src), "--compare", "sink,cascade", *CACHE, "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(PNG) and f"wrote {out}" in result.stderr
    assert "Final estimate" in result.stdout


@pytest.mark.parametrize("extra, needle", [(["--resume", "--checkpoint", "c.ckpt"], "drop --resume"),
                                           (["--each"], "drop --each")])
def test_ppl_plot_refuses_partial_streams(tiny, tmp_path, extra, needle):
    src = tmp_path / "a.txt"
    src.write_text(TEXT[:500])
    one_line_error(invoke(["ppl", str(src), "--plot", str(tmp_path / "p.png"), *extra]), 2, needle)


def test_plot_moving_average():
    from cascadectl.plot import moving_average

    assert list(moving_average([1, 2, 3, 4, 5], 2)) == [1.5, 2.5, 3.5, 4.5]
    assert list(moving_average([1, 3], 10)) == [2.0]  # a window longer than the series: its mean


@pytest.mark.slow
def test_quick_on_the_embedded_model(tmp_path):
    """`bench passkey --quick` and `bench retention --quick` on SmolLM2-135M (minutes on a busy 2-core CPU)."""
    result = invoke(["bench", "passkey", "--quick", "--json", "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    full = next(r for r in doc["results"] if r["policy"] == "full")
    assert full["exact"], full  # with exact attention the model finds the key at 1K tokens
    result = invoke(["bench", "retention", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["policy"]: r for r in json.loads(result.stdout)["summary"]}
    assert all(g["nll"] < rows["full"]["baseline"] / 2 for g in rows["full"]["gaps"])  # the copy is recalled
    sink = {g["relative"]: g["nll"] for g in rows["sink"]["gaps"]}
    assert sink[0.5] < rows["sink"]["baseline"] / 2 < sink[2.0]  # held inside the window, lost beyond it
