"""cascadectl: summarize, question and measure inputs far longer than a model's context, in one streaming pass."""
__version__ = "0.1.0"
