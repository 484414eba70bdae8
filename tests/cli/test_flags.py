"""Setting names -> flags: engine messages name settings, the CLI shows the flags (cascadectl/flags.py)."""
from __future__ import annotations

from dataclasses import fields

from cascadectl.flags import FLAGS, render
from engine.config import CacheConfig
from tests.cli.fakes import invoke


def test_render_shows_flags_and_leaves_other_backticks():
    assert render("`cache_size` (100) must be a multiple of `cascades` (3)") == \
        "--cache-size (100) must be a multiple of --cascades (3)"
    assert render("use `policy` cascade or sink; pass `dtype=bf16`") == "use --policy cascade or sink; pass --dtype bf16"
    assert render("a checkpoint of `ppl`, not of `ask`") == "a checkpoint of `ppl`, not of `ask`"


def test_every_cache_setting_has_its_flag():
    assert all(FLAGS[f.name] == "--" + f.name.replace("_", "-") for f in fields(CacheConfig))


def test_an_engine_error_reaches_stderr_with_the_flags(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("some text " * 20)
    result = invoke(["ppl", str(path), "--cache-size", "100", "--cascades", "3"])
    assert result.exit_code == 2
    assert "--cache-size (100) must be a multiple of --cascades (3)" in result.stderr
    assert "`" not in result.stderr
