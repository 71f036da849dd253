# Step 2: train a recipe on this machine's GPU(s), with the photometric augmentations on the
# device, and bring back its log, metrics and encoder.
#     bash training/gpu/train.sh training/recipes/NAME.toml [training.train flags]
# Flags after the recipe override it (e.g. --init-from "$INIT"). With BUDGET set and step 1's
# measurements in /tmp/gpu-plan, --epochs is the number whose schedule fits BUDGET seconds.
source training/gpu/common.sh
PLANNED=()
if [ -n "${BUDGET:-}" ] && [ -f "$PLAN/walls" ]; then
    python3 training/gpu/plan.py "$PLAN" | tee "$PLAN/plan.env" "$OUT/plan.env"
    source "$PLAN/plan.env"
    PLANNED=(--epochs "$EPOCHS")
fi
RUN=${RUN:-runs/gpu-$NAME}
timeout $((${BUDGET:-86400} + 50)) torchrun --standalone --nproc-per-node "$GPUS" \
    -m training.train --recipe "$RECIPE_FILE" --device-augment --data "$DATA" \
    --workers "$WORKERS" --ckpt-every-steps 0 --ckpt-every-epochs 10 --no-progress --out "$RUN" \
    ${PLANNED[@]+"${PLANNED[@]}"} "$@" > "$OUT/train.log" 2>&1
echo "train rc $?"
tail -3 "$OUT/train.log"
python3 -m training.checkpoint encoder "$RUN/checkpoint.pt" /tmp/encoder.pt
split -b 15M -d /tmp/encoder.pt "$OUT/encoder.pt.part"
cp "$RUN/metrics.jsonl" "$RUN/summary.json" "$OUT/"
echo "$RUN" > "$OUT/run.txt"
ls -la "$OUT"
