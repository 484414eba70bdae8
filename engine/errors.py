"""Typed engine errors. Each message names the setting to change; only the CLI turns them into exit codes."""


class CascadeError(Exception):
    """Base class for every error the engine reports to users."""


class ConfigError(CascadeError):
    """Settings that cannot work together (named by their CLI flags)."""


class CapacityError(ConfigError):
    """Positions or memory beyond what the model or machine can take."""


class UnsupportedModelError(CascadeError):
    """The model's architecture has no attention adapter."""


class ModelNotFoundError(CascadeError):
    """The model (embedded or --model) is not available locally."""


class ModelFileError(ModelNotFoundError):
    """A model file or store entry (GGUF, ollama manifest) that is damaged, truncated or crafted."""
