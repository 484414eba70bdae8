"""Setting names -> command-line flags: the one table, and the one place engine messages get their flags.

The engine names a setting in backticks (`cache_size`, `policy=full`: engine/errors.py); everything the CLI
prints on stderr or records as a row's error passes through `render`, which shows `--cache-size` and
`--policy full` instead. Every CacheConfig field is a setting (a field added there gets its flag here without an
edit); the others are the options of the commands that the engine's messages name."""
from __future__ import annotations

from dataclasses import fields

from engine.config import CacheConfig
from engine.errors import SETTING


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


FLAGS: dict[str, str] = {
    **{f.name: _flag(f.name) for f in fields(CacheConfig)},
    **{name: _flag(name) for name in (
        "memory", "max_tokens", "model", "dtype", "weights", "device", "question_weight", "quote", "checkpoint",
        "resume", "load_cache", "save_cache")},
}


def flag(name: str) -> str:
    """The flag of setting `name` (`--cache-size`)."""
    return FLAGS[name]


def render(message: str) -> str:
    """`message` with every known setting shown as its flag: `cache_size` -> --cache-size, `policy=full` ->
    --policy full; backticked words that are no setting (a command name) stay as they are."""
    def one(m) -> str:
        name, value = m.group(1), m.group(2)
        if name not in FLAGS:
            return m.group(0)
        return FLAGS[name] if value is None else f"{FLAGS[name]} {value}"

    return SETTING.sub(one, message)
