cd /work/main && . .venv/bin/activate
Q1="What is the secret code of the blue lantern?"; Q2="In which drawer does Mrs. Long keep her spare key?"
time cascadectl ask /tmp/qa/doc.txt -q "$Q1" -q "$Q2" --save-cache /tmp/qa/doc.kv --json > /tmp/qa/batch_read.json
for mode in --batch --no-batch; do
  /usr/bin/time -v cascadectl ask --load-cache /tmp/qa/doc.kv -q "$Q1" -q "$Q2" $mode --json > /tmp/qa/load$mode.json 2> /tmp/qa/load$mode.err
done
