#!/usr/bin/env bash
# The whole Emu recipe on the toy world, end to end, on a CPU:
# data -> autoencoder -> pretraining -> quality-tuning -> sampling -> pairwise evaluation.
# Creates .venv with the pinned requirements (and the test-only ones) on first use. Extra arguments are not passed on:
# run the scripts one by one to change their flags (each has --help).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-test.txt
fi
py=.venv/bin/python
step() { echo; echo "== $*"; local t0=$SECONDS; "$py" "$@"; echo "   ($((SECONDS - t0)) s)"; }
start=$SECONDS
step data/make_toy.py
step train_ae.py
step pretrain.py
step qtune.py
step sample.py --ckpt runs/qtune/best.pt --out runs/samples/qtune
step sample.py --ckpt runs/pretrain/ckpt.pt --out runs/samples/pretrain
step eval_pairs.py --a runs/qtune/best.pt --b runs/pretrain/ckpt.pt
echo; echo "toy pipeline done in $((SECONDS - start)) s; results in runs/eval/results.md"
