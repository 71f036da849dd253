# Sourced by measure.sh and train.sh: the environment and the shipped model's recipe.
set -u
export PYTHONUNBUFFERED=1
WHEELS=${WHEELS:-.devrun/whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl >/dev/null 2>&1 && export PYTHONPATH=/tmp/site
fi
DATA=${DATA:-.devdata}
WORKERS=${WORKERS:-14}
OUT=${OUT:?OUT: the folder for the files to bring back}
PLAN=/tmp/gpu-plan
RECIPE="--method barlow_twins --image-size 128 --batch-size 64 --optimizer lars --lr 0.25 --crop-scale 0.4 1 --in-memory --no-progress"
