"""The cascadectl engine: models, caches, strided prefill, generation. Never imports typer, rich or pypdf.

The public Python API is engine/api.py, re-exported here (`import engine; lm = engine.open_model()`); it is
imported on first use, so `import engine.config` stays as light as it was."""

_API = ("CacheConfig", "Document", "GREEDY", "LoadedModel", "PerplexityResult", "Prompt", "Sampling", "ask",
        "ask_prompt", "load", "open_model", "perplexity_of", "read", "summarize", "summary_prompt", "token_ids")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
