"""Write the first N tokens (embedded tokenizer) of the bundled novel, repeated as needed, as text on stdout."""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import book_ids  # noqa: E402
from engine.models import load_model  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, required=True)
args = ap.parse_args()
tok = load_model(None, "cpu", "bf16").tokenizer
sys.stdout.write(tok.decode(book_ids(tok, args.tokens)))
