"""The cascadectl engine: models, caches, strided prefill, generation. Never imports typer, rich or pypdf."""
