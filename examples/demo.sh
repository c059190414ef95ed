#!/usr/bin/env bash
# `make demo`: build a tiny Stable Diffusion pipeline and image-caption data set locally (random weights, no
# download), then train a LoKr adapter on an nf4-quantized base with the drop-in trainer, exactly as on a GPU.
set -euo pipefail
OUT=${1:-demo-output}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

"$PY" -m diffusers_lowmem.tiny "$OUT/tiny" --only sd,images

"$VENV/bin/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  -m diffusers_lowmem.train_text_to_image \
  --pretrained_model_name_or_path "$OUT/tiny/sd" \
  --train_data_dir "$OUT/tiny/images" \
  --resolution 32 --center_crop --random_flip \
  --train_batch_size 4 --max_train_steps 40 \
  --learning_rate 1e-3 --lr_scheduler constant --lr_warmup_steps 0 \
  --adapter lokr --quant nf4 --rank 8 \
  --checkpointing_steps 20 --checkpoints_total_limit 2 \
  --validation_prompt "a red circle" --num_validation_images 2 --validation_epochs 5 \
  --seed 0 --output_dir "$OUT/lokr-nf4"

echo
echo "Memory report ($OUT/lokr-nf4/memory_report.md):"
cat "$OUT/lokr-nf4/memory_report.md"
echo
echo "Adapter weights:  $OUT/lokr-nf4/pytorch_lora_weights.safetensors (kohya/LyCORIS format)"
echo "TensorBoard logs: $OUT/lokr-nf4/logs   (tensorboard --logdir $OUT/lokr-nf4/logs)"
echo "Load it:          diffusers_lowmem.load_adapter(StableDiffusionPipeline.from_pretrained('$OUT/tiny/sd'), '$OUT/lokr-nf4')"
