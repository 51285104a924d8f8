#!/usr/bin/env bash
# The whole ExGra-Med chain on a CPU, on synthetic data: build the demo data set, train
# configs/demo.py, evaluate VQA against two baselines (the untrained model, and an image-blind
# question prior), export to Hugging Face.
# Usage: bash launch/demo.sh [OUT_DIR]     (`make demo` sets up .venv and runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
PY=${PYTHON:-.venv/bin/python}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
DATA=$OUT/data
CFG="--config=configs/demo.py:$DATA"

echo "== 1/6 synthetic demo data -> $DATA"
[ -f "$DATA/vqa/test.json" ] || $PY tools/make_demo_data.py --out "$DATA"

echo "== 2/6 training configs/demo.py -> $OUT/run"
$PY launch/train.py $CFG --workdir="$OUT/run"

echo "== 3/6 untrained baseline (one step at lr 0) -> $OUT/untrained"
$PY launch/train.py $CFG --workdir="$OUT/untrained" --config.train.lr=0 \
    --config.train.total_steps=1 --config.alignment.enabled=False

echo "== 4/6 VQA evaluation"
$PY launch/eval.py $CFG --workdir="$OUT/run" --task=vqa --out="$OUT/run/vqa_answers.jsonl"
$PY launch/eval.py $CFG --workdir="$OUT/untrained" --task=vqa \
    --out="$OUT/untrained/vqa_answers.jsonl"

echo "== 5/6 image-blind baseline: each question's most common training answer -> $OUT/prior"
mkdir -p "$OUT/prior"
# The same training files as the model (configs/demo.py's data.json_paths).
$PY -m exgra_jax.eval.question_prior --train "$DATA/instruct.json" "$DATA/vqa/train.json" \
    --gt "$DATA/vqa/test.json" --candidates "$DATA/vqa/candidate.json" \
    --out "$OUT/prior/vqa_answers.jsonl" > "$OUT/prior/vqa_answers.metrics.json"

echo "== 6/6 Hugging Face export -> $OUT/hf"
$PY tools/convert_checkpoint.py to-hf --workdir "$OUT/run" --out "$OUT/hf"

$PY - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
rows = (("untrained model", "untrained"), ("question prior", "prior"), ("trained model", "run"))
metrics = {run: json.load(open(os.path.join(out, run, "vqa_answers.metrics.json")))
           for _, run in rows}
keys = ("closed_accuracy", "open_recall", "open_accuracy")
n = metrics["run"]
print(f"\nVQA on the synthetic demo test set ({n['num_closed']} closed, {n['num_open']} open "
      "questions; LLaVA-Med scoring, percent):")
print(f"{'':<18}" + "".join(f"{k:>17}" for k in keys))
for label, run in rows:
    print(f"{label:<18}" + "".join(f"{metrics[run][k]:>17.1f}" for k in keys))
margin = {k: metrics["run"][k] - metrics["prior"][k] for k in keys}
print(f"{'trained - prior':<18}" + "".join(f"{margin[k]:>+17.1f}" for k in keys))
final = json.load(open(os.path.join(out, "run", "final_metrics.json")))
print(f"\ntraining: {final.get('step')} steps, last loss {final.get('loss', float('nan')):.3f}")
print(f"workdir:      {out}/run (checkpoints, TensorBoard events in tb/)")
print(f"answers:      {out}/{{run,untrained,prior}}/vqa_answers.jsonl")
print(f"HF export:    {out}/hf (LlavaForConditionalGeneration.from_pretrained)")
PYEOF
