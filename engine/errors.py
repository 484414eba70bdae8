"""Typed engine errors. Each message names the setting to change; only the CLI turns them into exit codes.

Settings are named as the engine knows them, in backticks: `cache_size`, or `policy=full` for a setting with a
value. That reads as the keyword to pass from Python (engine/api.py); the CLI shows the same text with its
flags instead (--cache-size, --policy full: cascadectl/flags.py holds the one table), so no engine module
spells a CLI flag."""
from __future__ import annotations

import re

# `name` or `name=value`: a setting named in a message (names are lower-case identifiers)
SETTING = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")


def settings_named(message: str) -> list[str]:
    """The setting names a message refers to, in order."""
    return [m.group(1) for m in SETTING.finditer(message)]


class CascadeError(Exception):
    """Base class for every error the engine reports to users."""


class ConfigError(CascadeError):
    """Settings that cannot work together. `setting`: the one to change (by default the first one the message
    names), for callers that point at it, e.g. a form field or the CLI flag."""

    def __init__(self, message: str = "", setting: str | None = None):
        super().__init__(message)
        named = settings_named(message)
        self.setting = setting if setting is not None else (named[0] if named else None)


class CapacityError(ConfigError):
    """Positions or memory beyond what the model or machine can take."""


class UnsupportedModelError(CascadeError):
    """The model's architecture has no attention adapter."""


class ModelNotFoundError(CascadeError):
    """The model (embedded or --model) is not available locally."""


class ModelFileError(ModelNotFoundError):
    """A model file or store entry (GGUF, ollama manifest) that is damaged, truncated or crafted."""
