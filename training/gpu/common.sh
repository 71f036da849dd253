# Sourced by measure.sh and train.sh: the environment. The run's options come from a recipe
# file (training/recipes/NAME.toml), the scripts' first argument.
set -u
export PYTHONUNBUFFERED=1
WHEELS=${WHEELS:-.devrun/whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl >/dev/null 2>&1 && export PYTHONPATH=/tmp/site
fi
RECIPE_FILE=${1:?usage: bash training/gpu/$(basename "$0") training/recipes/NAME.toml [training.train flags]}
shift
[ -f "$RECIPE_FILE" ] || { echo "no recipe file $RECIPE_FILE" >&2; exit 2; }
DATA=${DATA:-.devdata}
WORKERS=${WORKERS:-14}
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$GPUS" -ge 1 ] 2>/dev/null || GPUS=1
OUT=${OUT:?OUT: the folder for the files to bring back}
PLAN=/tmp/gpu-plan
NAME=$(basename "$RECIPE_FILE" .toml)
