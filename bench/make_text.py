"""Write the first N tokens (embedded tokenizer) of the bundled novel, repeated as needed, as text on stdout."""
import argparse
import sys

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import book_ids  # noqa: E402
from engine.models import load_model  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, required=True)
args = ap.parse_args()
tok = load_model(None, "cpu", "bf16").tokenizer
sys.stdout.write(tok.decode(book_ids(tok, args.tokens)))
