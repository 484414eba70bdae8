#!/usr/bin/env bash
# The CPU measurements behind docs/BENCHMARKS.md (engine issue). Appends JSON lines to bench/results/cpu.jsonl.
#   bash bench/cpu_suite.sh                   (about 50 min on a 2-core CPU)
#   LONG_INGEST=262144 bash bench/cpu_suite.sh  (adds the 256K-token ingest, about 25 min more)
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results/cpu.jsonl
log() { echo "{\"load_average\": \"$(cut -d' ' -f1-3 /proc/loadavg)\", \"step\": \"$1\"}" >> "$out"; }
save_ppl() { python -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({'step': '$1', 'ppl': d}))" >> "$out"; }
log "ceiling"; python bench/cpu_ceiling.py >> "$out"
log "hf 2K"; python bench/ingest.py --tokens 2048 --hf >> "$out"
log "hf 8K"; python bench/ingest.py --tokens 8192 --hf >> "$out"
python bench/make_text.py --tokens 8192 > /tmp/cascadectl_8k.txt
python bench/make_text.py --tokens 220000 > /tmp/cascadectl_220k.txt
log "ppl 8K"
cascadectl ppl /tmp/cascadectl_8k.txt --compare full,sink,cascade --cache-size 4096 --stride 1024 --json -q | save_ppl "ppl 8K"
log "sink 16K"; python bench/ingest.py --tokens 16384 --policy sink --cache-size 4096 --stride 1024 >> "$out"
for n in 16384 65536 ${LONG_INGEST:-}; do
  log "cascade $n"; python bench/ingest.py --tokens $n --cache-size 4096 --stride 1024 >> "$out"
done
log "ppl 220K"
cascadectl ppl /tmp/cascadectl_220k.txt --compare sink,cascade --cache-size 4096 --stride 1024 --json -q | save_ppl "ppl 220K"
log "done"
