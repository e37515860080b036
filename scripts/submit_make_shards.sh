#!/bin/bash
# Submit make_shards over NUM_TASKS SLURM array tasks: plan -> run (array) -> merge.
#
#   scripts/submit_make_shards.sh INPUT_DIR OUT_DIR NUM_TASKS [make_shards options]
#
# Extra sbatch options (partition, account, ...) go in SBATCH_* environment variables,
# e.g. SBATCH_PARTITION=cpu SBATCH_ACCOUNT=tempo scripts/submit_make_shards.sh ...
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 INPUT_DIR OUT_DIR NUM_TASKS [make_shards options]" >&2
    exit 2
fi
IN=$1
OUT=$2
N=$3
shift 3
HERE=$(cd "$(dirname "$0")" && pwd)
SCRIPT=$HERE/make_shards_array.sbatch

plan=$(MAKE_SHARDS_STEP=plan sbatch --parsable --array=0 "$SCRIPT" "$IN" "$OUT" "$@")
run=$(MAKE_SHARDS_STEP=run sbatch --parsable --array=0-$((N - 1)) \
    --dependency=afterok:"${plan%%;*}" "$SCRIPT" "$IN" "$OUT" "$@")
merge=$(MAKE_SHARDS_STEP=merge sbatch --parsable --array=0 \
    --dependency=afterok:"${run%%;*}" "$SCRIPT" "$IN" "$OUT" "$@")
echo "plan job ${plan%%;*}, run array ${run%%;*} ($N tasks), merge job ${merge%%;*}"
