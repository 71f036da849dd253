# Step 1: the GPU, the stack, and the epoch time of a recipe with and without --device-augment.
#     bash training/gpu/measure.sh training/recipes/NAME.toml [training.train flags]
source training/gpu/common.sh
mkdir -p "$PLAN"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision, jsonschema; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
echo "cores $(nproc)" | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
timeout 150 python3 -m training.train --recipe "$RECIPE_FILE" --data "$DATA/train" --epochs 3 \
    --eval-every 3 --device-augment --workers "$WORKERS" --ckpt-every-steps 0 \
    --ckpt-every-epochs 3 --no-progress --out "$PLAN/device-augment" "$@" \
    > "$OUT/measure-device-augment.log" 2>&1
echo "device-augment rc $?"
t1=$(date +%s)
timeout 90 python3 -m training.train --recipe "$RECIPE_FILE" --data "$DATA/train" --epochs 2 \
    --eval-every 0 --no-device-augment --workers "$WORKERS" --ckpt-every-steps 0 --no-progress \
    --out "$PLAN/workers" "$@" > "$OUT/measure-workers.log" 2>&1
echo "workers rc $?"
t2=$(date +%s)
echo "$((t1 - t0)) $((t2 - t1))" > "$PLAN/walls"
cp "$PLAN/device-augment/metrics.jsonl" "$OUT/measure-device-augment.jsonl"
cp "$PLAN/workers/metrics.jsonl" "$OUT/measure-workers.jsonl"
python3 training/gpu/plan.py "$PLAN" | tee "$OUT/plan.env"
