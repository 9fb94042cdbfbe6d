#!/usr/bin/env bash
# Where a GPU run's time goes, in one call on a GPU machine (the companion of gpu_check.sh,
# which measures; this one explains):
#
#     bash benchmarks/gpu_profile.sh [SIZE]     # default 4GB; results in $OUT/profile.log
#
# Makes a SIZE bf16 checkpoint, then runs each op through benchmarks/stage_profile.py (the
# engine's stages timed, cProfile's top of the main thread) on cuda, the ops whose CPU path
# differs most on cpu too, compare once more with a synchronize after each chunk (the GPU's
# own time), and benchmarks/host_paths.py on one shard (read, host-to-device and write rates,
# one thread and several). One log file, so that it comes back whole. Downloads nothing.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-$(command -v python || command -v python3)}
SIZE=${1:-4GB}
OUT=${OUT:-$PWD/gpu-profile-out}
W=${GPU_PROFILE_WORK:-/tmp/stream-tv-gpu-profile}
mkdir -p "$OUT" "$W"
LOG=$OUT/profile.log
export STREAM_TV_CACHE_DIR=$W/memo
exec > >(tee -a "$LOG") 2>&1

echo "== $(date -Is) $(hostname), $(nproc) cores; size $SIZE"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== pytest -m cuda tests/test_lowrank.py"
timeout 90 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_lowrank.py 2>&1 | tail -n 4
t0=$(date +%s)
"$PY" benchmarks/make_checkpoint.py --size "$SIZE" --dtype bf16 --shard-size 5GB --rank 16 \
    --out "$W/ck" --quiet || exit 1
echo "== checkpoint made in $(($(date +%s) - t0)) s"
B=$W/ck/base F=$W/ck/finetuned A=$W/ck/adapter

prof() {  # prof NAME [stage_profile options] -- stream-tv args
    local name=$1
    shift
    echo
    echo "================ $name"
    local t=$(date +%s)
    timeout 150 "$PY" benchmarks/stage_profile.py --top 25 "$@" --quiet
    echo "== $name: rc $?, $(($(date +%s) - t)) s"
}

prof compare-cpu -- compare --base "$B" --finetuned "$F" --adapter "$A" --json "$W/c1.json" --device cpu
prof compare-cuda -- compare --base "$B" --finetuned "$F" --adapter "$A" --json "$W/c2.json" --device cuda
prof compare-cuda-sync --sync -- compare --base "$B" --finetuned "$F" --adapter "$A" --json "$W/c3.json" --device cuda
prof extract-cuda -- extract "$B" "$F" -o "$W/tv" --overwrite --device cuda
prof extract-cpu -- extract "$B" "$F" -o "$W/tv-cpu" --overwrite --device cpu
rm -rf "$W/tv-cpu"
prof apply-cuda -- apply "$B" "$W/tv" -o "$W/applied" --overwrite --device cuda
rm -rf "$W/applied"
prof merge-cuda -- merge "$B" "$A" -o "$W/merged" --overwrite --device cuda
prof merge-cpu -- merge "$B" "$A" -o "$W/merged" --overwrite --device cpu
rm -rf "$W/merged"
prof lora-delta-cuda -- lora-delta "$A" --base "$B" -o "$W/ld" --overwrite --device cuda
echo
echo "================ host paths"
shard=$(ls "$B"/*.safetensors | head -n 1)
timeout 90 "$PY" benchmarks/host_paths.py "$shard" --repeat 2 --max-bytes 2GB --out-dir "$W"
echo "== done $(date -Is)"
[[ "${GPU_PROFILE_KEEP:-0}" == 1 ]] || rm -rf "$W"
