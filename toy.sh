#!/usr/bin/env bash
# The whole Emu recipe on the toy world, end to end, on a CPU:
# data -> autoencoder -> pretraining -> curation funnel -> quality-tuning -> sampling -> pairwise evaluation.
# Creates .venv with the pinned requirements (and the test-only ones) on first use. Extra arguments are not passed on:
# run the scripts one by one to change their flags (each has --help). Then `bash toy.sh editor` opens the demo's editor.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-test.txt
fi
py=.venv/bin/python
step() { echo; echo "== $*"; local t0=$SECONDS; "$py" "$@"; echo "   ($((SECONDS - t0)) s)"; }
if [ "${1:-}" = "editor" ]; then
  # After the pipeline: Kandinsky's toy parts, once (MoVQ, the linear prior, and the inpainting decoder, which
  # draws every mode of the demo, trained in aspect buckets on a haystack with 40% of its scenes at the other
  # four ratios), then the editor on http://127.0.0.1:8001 until Ctrl-C.
  [ -d runs/toy/haystack-ratios ] || step data/make_toy.py --aspect-share 0.4 --towers none --out runs/toy/haystack-ratios
  [ -f runs/movq/ckpt.pt ] || step train_ae.py --arch kandinsky
  [ -f runs/prior/prior.pt ] || step train_prior.py --kind linear
  [ -f runs/kandinsky/editor/ckpt.pt ] || step pretrain.py --arch kandinsky --preset toy-inpaint --buckets \
    --data runs/toy/haystack-ratios --steps 2100 --out runs/kandinsky/editor
  exec "$py" sample.py serve --ckpt runs/kandinsky/editor/ckpt.pt
fi
start=$SECONDS
step data/make_toy.py --no-xlmr
step train_ae.py
step pretrain.py
step data/curate.py train-aesthetic
step data/curate.py --blocklist data/blocklist.txt --aesthetic-head runs/curate/aesthetic.safetensors --aesthetic-min 5.5 \
  --text-max-words 4 --min-size 32 --max-aspect 2 --clusters 16 --per-cluster 80 --min-likes 40
step data/curate.py simulate --stage generalists
step data/curate.py simulate --stage specialists
step data/curate.py simulate --stage captions
step qtune.py --curate-top 0 --data runs/curate/curated --caption-field "" --holdout 11
step sample.py --ckpt runs/qtune/best.pt --out runs/samples/qtune
step sample.py --ckpt runs/pretrain/ckpt.pt --out runs/samples/pretrain
step eval_pairs.py --a runs/qtune/best.pt --b runs/pretrain/ckpt.pt
echo; echo "toy pipeline done in $((SECONDS - start)) s; results in runs/eval/results.md"
