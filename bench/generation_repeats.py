"""Does a summary repeat itself? Distinct 4-grams of `cascadectl summarize` under greedy and other settings.

Summarizes the first 12 KB of the bundled novel once per setting (default: greedy, the defaults, and a few
repetition controls), each as its own `python -m cascadectl summarize - --json ...` run, one after the other:

    python bench/generation_repeats.py
    python bench/generation_repeats.py --setting "--temperature 0" --setting "--repeat-penalty 1.2"

distinct-4 = distinct word 4-grams / all word 4-grams of the summary (words: lowercased runs of letters, digits
and apostrophes; 1.0 = no 4-gram twice). Also the most times one sentence or line occurs. Prints the machine and
versions, one JSON row per setting (its command, the run's generation record), then a markdown table."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import provenance  # noqa: E402

SETTINGS = ["--temperature 0", "", "--repeat-penalty 1.2", "--repeat-penalty 1.5",
            "--temperature 0.2 --top-p 0.9", "--temperature 0.7 --top-p 0.9 --repeat-penalty 1.1"]


def distinct_4(text: str) -> tuple[float, int]:
    """(distinct word 4-grams / all word 4-grams, number of 4-grams); 1.0 for a text under 4 words."""
    words = re.findall(r"[\w']+", text.lower())
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    return (len(set(grams)) / len(grams) if grams else 1.0), len(grams)


def most_repeated_sentence(text: str) -> int:
    """Most times one sentence or line (of 3+ words) occurs in `text`."""
    sentences = [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if len(s.split()) >= 3]
    return max(Counter(sentences).values(), default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes", type=int, default=12_000, help="leading bytes of the novel to summarize")
    ap.add_argument("--setting", action="append", help="summarize options to compare (repeatable)")
    ap.add_argument("--extra", default="", help="options added to every run, e.g. '--device cpu'")
    args = ap.parse_args()
    book = (ROOT / "data" / "pride_and_prejudice.txt").read_bytes()[: args.bytes].decode("utf-8", "ignore")
    print(json.dumps(provenance()), flush=True)
    rows = []
    for setting in args.setting or SETTINGS:
        argv = [sys.executable, "-m", "cascadectl", "summarize", "-", "--json", *args.extra.split(), *setting.split()]
        shown = f"head -c {args.bytes} data/pride_and_prejudice.txt | cascadectl summarize - --json " \
                f"{args.extra} {setting}".replace("  ", " ").strip()
        done = subprocess.run(argv, input=book, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            sys.exit(f"{shown}: exit {done.returncode}: {done.stderr.strip()[-400:]}")
        doc = json.loads(done.stdout)
        ratio, n = distinct_4(doc["answer"])
        row = {"setting": setting or "(defaults)", "command": shown, "distinct_4": round(ratio, 3), "four_grams": n,
               "generated_tokens": doc["stats"]["generated_tokens"],
               "most_repeated_sentence": most_repeated_sentence(doc["answer"]),
               "generation": doc["record"]["generation"], "answer": doc["answer"]}
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    print("\n| setting | distinct 4-grams | 4-grams | tokens | most repeats of a sentence |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| `{r['setting']}` | {r['distinct_4']:.2f} | {r['four_grams']} | {r['generated_tokens']} | "
              f"{r['most_repeated_sentence']} |")


if __name__ == "__main__":
    main()
