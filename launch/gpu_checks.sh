#!/usr/bin/env bash
# Every GPU check and benchmark of this project in one run, for a session lent a GPU for a few minutes.
#
#   bash launch/gpu_checks.sh prepare     # here, with PyPI: wheels for what the GPU image lacks -> .whl/
#   bash launch/gpu_checks.sh run         # there: results under $OUT (default gpu_out/), about 7 minutes on an H100
#
# With the device tool: run(command="bash launch/gpu_checks.sh run", carry=[".whl"], timeout_s=540).
# The GPU image has torch, triton, timm, einops, msgpack, ninja, psutil, py-cpuinfo but not DeepSpeed or DALI:
# DeepSpeed travels as a pure-Python wheel with its missing dependencies (pydantic 2.14 needs typing_extensions
# >= 4.16, newer than the image may hold, so that travels too); DALI (800 MB) cannot, so the data step
# times the torch pipeline on the GPU. Each step has its own time limit and a failing step does not stop the next:
# the point of a short lease is to learn as much as possible from one call. What comes back (at most 8 files):
# log.txt (every step's output), summary.txt (one line per step), kernels.md, bench_model.json, bench_sweep.json,
# data.txt.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."

prepare() {
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 || return 1
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        typing_extensions==4.16.0 \
        || return 1
    ls -l .whl
}

OUT=${OUT:-gpu_out}
step() {  # step NAME SECONDS COMMAND...: run with a limit, log everything, one summary line
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name ($(date -u +%FT%TZ)): $*" | tee -a "$OUT/log.txt"
    # through bash -c so a step can be one of this script's functions (exported below)
    timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" >>"$OUT/log.txt" 2>&1
    rc=$?
    echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

install() {
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
    fi
    python3 -m pip install -q --no-deps --no-build-isolation -e . || return 1
    python3 -c "import deepspeed, cmae_ds.kernels; print('deepspeed', deepspeed.__version__)"
}

smoke_config() {  # the debug preset under bf16 ZeRO-2 at micro-batch 16: the engine's GPU path, in seconds
    python3 - <<'EOF'
import json
ds = json.load(open('ds_configs/zero2_bf16.json'))
ds['train_micro_batch_size_per_gpu'] = 16
json.dump(ds, open('/tmp/zero2_bf16_m16.json', 'w'), indent=1)
EOF
}

run() {
    mkdir -p "$OUT"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
    {
        date -u
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
        git log --oneline -1
    } >"$OUT/env.txt" 2>&1
    cat "$OUT/env.txt" >>"$OUT/log.txt"
    step install 120 install
    # Compiled Triton kernels against their references (the test suite only interprets them), then timings.
    step kernels 120 python3 -m cmae_ds.kernels.bench --iters 50 --out "$OUT/kernels.md"
    step attention_tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_adamw.py
    step bench_model 150 python3 launch/benchmark.py --mode model --config cmae_vit_base_300e \
        --deepspeed_config ds_configs/zero1_bf16.json --micro 128 --warmup 5 --steps 20 --compare-fusion \
        --out "$OUT/bench_model.json"
    step bench_sweep 150 python3 launch/benchmark.py --mode model --config cmae_vit_base_300e \
        --sizes vit_base vit_large --deepspeed_config ds_configs/zero2_bf16.json ds_configs/zero3_bf16.json \
        --micro 64 --warmup 3 --steps 10 --out "$OUT/bench_sweep.json"
    step data_torch 120 sh -c "python3 -m cmae_ds.data.bench --device cuda --pipelines torch --threads 14 \
        --images 2048 --batch 128 --epochs 1 | tee $OUT/data.txt"
    smoke_config
    step pretrain_smoke 90 python3 launch/pretrain.py --deepspeed_config /tmp/zero2_bf16_m16.json \
        train.max_steps=24 train.save_every_steps=12 train.output_dir=/tmp/smoke train.progress_bar=false
    step pretrain_resume 60 python3 launch/pretrain.py --deepspeed_config /tmp/zero2_bf16_m16.json --resume auto \
        train.max_steps=12 train.save_every_steps=12 train.output_dir=/tmp/smoke train.progress_bar=false
    cat "$OUT/summary.txt"
}

export -f install
[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0  # sourced (tests): functions only
case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash launch/gpu_checks.sh prepare|run" >&2; exit 2 ;;
esac
