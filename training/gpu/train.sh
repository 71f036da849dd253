# Step 2: one schedule from $INIT that ends within $BUDGET seconds, on the GPU.
source training/gpu/common.sh
INIT=${INIT:-.devinit/init.fp16.pt}
python3 training/gpu/plan.py "$PLAN" | tee "$PLAN/plan.env" "$OUT/plan.env"
source "$PLAN/plan.env"
RUN=runs/bt-gpu-${EPOCHS}ep-bs64-lars0.25-crop0.4
timeout $((${BUDGET:-470} + 50)) python3 -m training.train $RECIPE --data "$DATA" --epochs "$EPOCHS" \
    --eval-at-start --eval-every 20 --device-augment --workers "$WORKERS" --ckpt-every-epochs 10 \
    --init-from "$INIT" --out "$RUN" > "$OUT/train.log" 2>&1
echo "train rc $?"
tail -3 "$OUT/train.log"
python3 -m training.checkpoint encoder "$RUN/checkpoint.pt" /tmp/encoder.pt
split -b 15M -d /tmp/encoder.pt "$OUT/encoder.pt.part"
cp "$RUN/metrics.jsonl" "$RUN/summary.json" "$OUT/"
echo "$RUN" > "$OUT/run.txt"
ls -la "$OUT"
