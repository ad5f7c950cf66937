#!/usr/bin/env bash
# Every GPU check and benchmark of this project in one run, for a session lent a GPU for a few minutes.
#
#   bash launch/gpu_checks.sh prepare     # here, with PyPI: wheels for what the GPU image lacks -> .whl/
#   bash launch/gpu_checks.sh run         # there: results under $OUT (default gpu_out/), at most 8 minutes
#   bash launch/gpu_checks.sh dry-run     # here, on the CPU: the same steps on the debug model and tiny inputs
#                                         # (GPU-only steps skipped; limits and budget x3; 6-10 minutes)
#
# With the device tool: run(command="bash launch/gpu_checks.sh run", carry=[".whl"], timeout_s=540).
# The GPU image has torch 2.11 (this project is developed on 2.14), triton, timm, einops, msgpack, ninja, psutil,
# py-cpuinfo but not DeepSpeed or DALI: DeepSpeed travels as a pure-Python wheel with its missing dependencies
# (pydantic 2.14 needs typing_extensions >= 4.16, newer than the image may hold, so that travels too); DALI (800 MB)
# cannot, so the data steps run the torch_gpu pipeline (nvJPEG through torchvision, views as torch ops). Each step
# has its own time limit, a failing step does not stop the next, and the steps share a budget (BUDGET_S, 460 s; the
# report gets 20 s more): a step gets at most what is left and one that would get under 5 s is skipped, so the run
# ends inside 8 minutes whatever happens. Only a failed install, or a package of this project that does not import
# on the image's torch, stops the run (one line in summary.txt): every later step would fail the same way.
#
# Every step runs eager (model.compile=eager named on each launch: `auto` would compile per block on CUDA, 35-60 s
# of inductor per process, more for a fusion-off cell) except compile_bl, which measures the compiler: one eager
# and one compiled cell per configuration, the compiled one cold (dynamo reset, inductor's caches off). The timed
# steps use torch's fused AdamW (train.optimizer=torch_fused) unless DeepSpeed's fused_adam op is already built
# when the run starts (then 'auto', which takes it); its nvcc build is a step of its own near the end.
#
# Estimate per step on one H100/H200 (989 bf16 TFLOP/s dense, 40% MFU assumed; train FLOPs per image from
# cmae_ds.tasks.flops: ViT-B 112 G, ViT-L 291 G, ViT-H 730 G; a step takes 18-36 ms for ViT-B at micro 64-128,
# 47-94 ms for ViT-L, 58-117 ms for ViT-H at 32-64, so engine set-up (~6-10 s a cell), process starts and compiling
# dominate), in order, seconds:
#   install 20, imports 10, torch_compat 20 (the project's compile tests on the image's torch, on its CPU),
#   make_jpegs 20, data_torch_gpu 15, model_b 40 (fused and unfused), e2e_b 25, model_l 25
#     -> 175 s: the headline figures (ViT-B model-only and e2e images/s and MFU, the data rate, one ViT-L cell);
#   pretrain_smoke 25, pretrain_resume 15, data_gpu_tests 25, kernels 30, attention_tests 20 -> 290 s;
#   compile_bl 130 (ViT-B and ViT-L on ZeRO-2: per pair ~10 s eager, ~55 s compiling cold) -> 420 s;
#   step_settings_b 40 (two e2e cells: the step's host reads and syncs before issue 33, then now),
#   sweep_bl 80, sweep_h 65, ckpt_h 25, fused_adam 50, adamw_tests 10, report 3:
# about 420 s (7 min) expected up to compile_bl; step_settings_b and what follows (optional_steps last) run on what
# the budget has left (a sweep cut by its limit still returns the cells it finished), else are skipped.
#
# What comes back (at most 8 files): log.txt (every step's output), summary.txt (one line per step), env.txt,
# kernels.md, data.json, results.json (every benchmark row), benchmarks.md (a fragment for docs/benchmarks.md).
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
WORK=${WORK:-/tmp/gpu_checks}  # intermediate files: only 8 files come back from $OUT
BUDGET_S=${BUDGET_S:-460}
DRY=${DRY:-0}
SCALE=1  # the dry run's CPU steps get 3x the GPU limits (and budget)
step() {  # step NAME SECONDS COMMAND...: run with a limit (capped by the budget), log everything, one summary line
    local name=$1 limit=$2 t0=$SECONDS rc left
    shift 2
    left=$((BUDGET_S - SECONDS))
    if ((left < 5)); then
        echo "$name: skipped (budget of ${BUDGET_S} s spent)" | tee -a "$OUT/summary.txt"
        return 0
    fi
    ((limit = limit * SCALE, limit > left)) && limit=$left
    echo "=== $name ($(date -u +%FT%TZ), limit $limit s): $*" | tee -a "$OUT/log.txt"
    # through bash -c so a step can be one of this script's functions (exported below)
    timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" >>"$OUT/log.txt" 2>&1
    rc=$?
    echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    return $rc
}

stop() {  # stop WHY: the one line that ends the run's steps (the report still runs)
    echo "stopped: $1" | tee -a "$OUT/summary.txt"
}

gpu_step() {  # a step that means nothing without a GPU: the dry run skips it
    if ((DRY)); then
        echo "$1: skipped (dry run)" | tee -a "$OUT/summary.txt"
        return 0
    fi
    step "$@"
}

install() {
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
    fi
    python3 -m pip install -q --no-deps --no-build-isolation -e . || return 1
    python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)"
}

imports() {  # every module of the project imports on this torch (an API it uses may be missing in torch 2.11)
    python3 - <<'EOF'
import importlib
import pkgutil
import sys

import cmae_ds

bad = []
for m in pkgutil.walk_packages(cmae_ds.__path__, 'cmae_ds.'):
    try:
        importlib.import_module(m.name)
    except Exception as e:  # every failure reported, then the step fails
        bad.append(f'{m.name}: {type(e).__name__}: {e}')
print('\n'.join(bad) or 'every cmae_ds module imports')
sys.exit(1 if bad else 0)
EOF
}

smoke_config() {  # the debug preset under bf16 ZeRO-2 at micro-batch 16: the engine's GPU path, in seconds
    python3 - <<'EOF'
import json
ds = json.load(open('ds_configs/zero2_bf16.json'))
ds['train_micro_batch_size_per_gpu'] = 16
json.dump(ds, open('/tmp/zero2_bf16_m16.json', 'w'), indent=1)
EOF
}

sizes() {  # the run's scale; the dry run: the debug model on tiny inputs on the CPU, the same steps
    if ((DRY)); then
        DEVICE=cpu SIZE_B=debug SIZES_BL=debug SIZE_H=debug MICRO_B=4 MICROS_BL="2 4" MICROS_H=2 MICROS_CKPT=4
        MICRO_COMPILE=2 MICRO_L=2 IMAGES=48 JPEG_SIZE="64 48" DATA_BATCH=8 DATA_THREADS=1 DATA_SIZE=32 TIMING="--warmup 1 --steps 2"
        SMALL="model.img_size=32 model.patch_size=8" SMOKE_STEPS=4 SCALE=3 BUDGET_S=$((3 * BUDGET_S))
        # the CPU engine's JIT op (step shm_comm) built where no other process on a shared machine rebuilds it
        export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
        # The CUDA default forced: compile_bl compiles per block here too, traced by dynamo as on the GPU and run by
        # the eager backend (inductor's C++ would take minutes); every other launch names its choices explicitly.
        export CMAE_COMPILE_BACKEND=eager
    else
        DEVICE=cuda SIZE_B=vit_base SIZES_BL="vit_base vit_large" SIZE_H=vit_huge MICRO_B=128 MICROS_BL="64 128"
        MICROS_H="32 64" MICROS_CKPT="64 128" MICRO_COMPILE=64 MICRO_L=64 IMAGES=4096 JPEG_SIZE="500 375" DATA_BATCH=256 DATA_THREADS=8
        DATA_SIZE=224 TIMING="--warmup 3 --steps 10" SMALL="" SMOKE_STEPS=24
    fi
    export DEVICE SIZE_B SIZES_BL SIZE_H MICRO_B MICROS_BL MICROS_H MICROS_CKPT MICRO_COMPILE MICRO_L IMAGES JPEG_SIZE DATA_BATCH \
        DATA_THREADS DATA_SIZE TIMING SMALL SMOKE_STEPS WORK OUT
}

make_jpegs() {  # ImageNet-size JPEGs (500x375, photo content + grain, ~110 KB), written by 8 processes
    python3 - <<'EOF'
import os
from multiprocessing import Pool
from pathlib import Path

from cmae_ds.data.tools.bench import write_imagenet_like

n, size = int(os.environ['IMAGES']), tuple(int(v) for v in os.environ['JPEG_SIZE'].split())
root = Path(os.environ['WORK']) / 'jpegs'
with Pool(8) as pool:
    pool.starmap(write_imagenet_like, [(root / f'part{k}', n // 8, size, k) for k in range(8)])
print(len(list(root.rglob('*.jpg'))), 'JPEGs in', root)
EOF
}

data_rate() {  # the torch_gpu pipeline alone: both views, images/s
    python3 -m cmae_ds.data.tools.bench --root "$WORK/jpegs" --device "$DEVICE" --pipelines torch_gpu \
        --threads "$DATA_THREADS" --batch "$DATA_BATCH" --img-size "$DATA_SIZE" --epochs 3 --json "$OUT/data.json"
}

bench() {  # bench NAME ARGS...: launch/benchmark.py, its rows to $WORK/NAME.json
    local name=$1 opts=() overrides=() a
    shift
    # key=value overrides go last, after a one-value option: --micro and --deepspeed_config take several values
    for a in "$@"; do
        if [[ $a != -* && $a == *=* ]]; then overrides+=("$a"); else opts+=("$a"); fi
    done
    python3 launch/benchmark.py --config cmae_vit_base_300e $TIMING "${opts[@]}" --out "$WORK/$name.json" \
        train.progress_bar=false train.optimizer="$ADAMW" model.compile=eager $SMALL "${overrides[@]}"
}

model_b() {  # ViT-B model only (synthetic batches on the device), fused and unfused: the e2e step's reference
    bench model_b --mode model --deepspeed_config ds_configs/zero1_bf16.json --micro "$MICRO_B" --compare-fusion \
        model.size="$SIZE_B"
}

e2e_b() {  # the same ViT-B step fed by torch_gpu from the JPEGs: its data-wait fraction
    bench e2e_b --mode e2e --deepspeed_config ds_configs/zero1_bf16.json --micro "$MICRO_B" model.size="$SIZE_B" \
        data.source=folder data.root="$WORK/jpegs" data.pipeline=torch_gpu
}

step_settings_b() {  # the e2e ViT-B step with the settings before issue 33 and now, side by side in one process
    bench step_settings_b --mode e2e --compare-step-settings --deepspeed_config ds_configs/zero2_bf16.json \
        --micro "$MICRO_B" model.size="$SIZE_B" data.source=folder data.root="$WORK/jpegs" data.pipeline=torch_gpu
}

model_l() {  # one ViT-L cell (ZeRO-2): the headline's large-model figure, before the sweeps
    bench model_l --mode model --deepspeed_config ds_configs/zero2_bf16.json --micro "$MICRO_L" \
        model.size="${SIZES_BL##* }"
}

sweep_bl() {
    bench sweep_bl --mode model --sizes $SIZES_BL --micro $MICROS_BL \
        --deepspeed_config ds_configs/zero1_bf16.json ds_configs/zero2_bf16.json ds_configs/zero3_bf16.json
}

sweep_h() {
    bench sweep_h --mode model --sizes $SIZE_H --micro $MICROS_H \
        --deepspeed_config ds_configs/zero1_bf16.json ds_configs/zero2_bf16.json ds_configs/zero3_bf16.json
}

ckpt_h() {  # ViT-H with activation checkpointing, beside sweep_h's ZeRO-2 rows without it
    bench ckpt_h --mode model --sizes $SIZE_H --micro $MICROS_CKPT --deepspeed_config ds_configs/zero2_bf16.json \
        model.activation_checkpointing=true
}

compile_bl() {  # eager against compiled per block, bf16 ZeRO-2, ViT-B then ViT-L: one pair each, compiled cold
    # --compare-compile runs the pair alone and resets dynamo before the compiled cell; inductor's on-disk caches
    # off, so each compile time is what a fresh process on a fresh machine pays
    export TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0
    bench compile_b --mode model --sizes "$SIZE_B" --micro $MICRO_COMPILE --compare-compile \
        --deepspeed_config ds_configs/zero2_bf16.json
    bench compile_l --mode model --sizes "${SIZES_BL##* }" --micro $MICRO_COMPILE --compare-compile \
        --deepspeed_config ds_configs/zero2_bf16.json
}

pretrain_smoke() {  # the debug preset: SMOKE_STEPS steps with a checkpoint half-way (torch_gpu on the GPU)
    python3 launch/pretrain.py --deepspeed_config /tmp/zero2_bf16_m16.json --resume none \
        train.max_steps="$SMOKE_STEPS" train.save_every_steps=$((SMOKE_STEPS / 2)) train.output_dir="$WORK/smoke" \
        train.progress_bar=false train.optimizer="$ADAMW" model.compile=eager $SMALL
}

pretrain_resume() {  # from the last checkpoint, half as many steps again
    python3 launch/pretrain.py --deepspeed_config /tmp/zero2_bf16_m16.json --resume auto \
        train.max_steps=$((SMOKE_STEPS / 2)) train.save_every_steps=$((SMOKE_STEPS / 2)) \
        train.output_dir="$WORK/smoke" train.progress_bar=false train.optimizer="$ADAMW" model.compile=eager $SMALL
}

adamw_choice() {  # 'auto' only when DeepSpeed's fused_adam is built: its first use would compile it, in a timed step
    if timeout 60 python3 -m cmae_ds.kernels.optim.jit_ops ready fused_adam; then ADAMW=auto; else ADAMW=torch_fused; fi
    echo "AdamW of the timed steps: train.optimizer=$ADAMW"
    export ADAMW
}

build_fused_adam() {  # nvcc, in a step of its own; stale build locks (a killed build under an older torch) go first
    python3 -m cmae_ds.kernels.optim.jit_ops build fused_adam
}

run() {
    mkdir -p "$OUT" "$WORK"
    sizes
    ((DRY)) || export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
    export PYTHONUNBUFFERED=1
    {
        date -u
        ((DRY)) || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
        git log --oneline -1
    } >"$OUT/env.txt" 2>&1
    cat "$OUT/env.txt" >>"$OUT/log.txt"
    if gpu_step install 90 install; then
        steps
    else
        stop 'install failed (log.txt): no later step can run without it'
    fi
    BUDGET_S=$((BUDGET_S + 20)) step report 20 python3 launch/gpu_report.py "$OUT" "$WORK"
    cat "$OUT/summary.txt"
}

steps() {  # in order of importance: the headline figures first, then the proofs, the compiler, the rest
    step imports 60 imports || { stop "cmae_ds does not import on this torch (log.txt)"; return; }
    adamw_choice >>"$OUT/log.txt" 2>&1
    # On the CPU, DeepSpeed's first process group compiles its shared-memory collectives (a GPU has none to build).
    ((DRY)) && step shm_comm 120 python3 -m cmae_ds.kernels.optim.jit_ops build deepspeed_shm_comm
    # The project on the image's torch: its compile tests trace every model with dynamo (on the CPU; the dry run
    # skips them: the suite runs them on this torch).
    gpu_step torch_compat 60 python3 -m pytest -q -x -p no:cacheprovider -m 'not slow' tests/test_compile.py
    smoke_config
    step make_jpegs 60 make_jpegs
    step data_torch_gpu 60 data_rate
    step model_b 90 model_b
    step e2e_b 60 e2e_b
    step model_l 60 model_l
    step pretrain_smoke 60 pretrain_smoke
    step pretrain_resume 45 pretrain_resume
    # torch_gpu on CUDA against the same graph on CPU tensors; its views without a host wait; the resize bound.
    gpu_step data_gpu_tests 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_data_gpu_pipeline.py \
        tests/test_data_gpu_contracts.py
    # Compiled Triton kernels against their references (the test suite only interprets them), then timings.
    gpu_step kernels 90 python3 -m cmae_ds.kernels.bench --iters 30 --out "$OUT/kernels.md"
    gpu_step attention_tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_attention.py
    step compile_bl 150 compile_bl
    step step_settings_b 60 step_settings_b
    step sweep_bl 120 sweep_bl
    step sweep_h 90 sweep_h
    step ckpt_h 60 ckpt_h
    gpu_step fused_adam 120 build_fused_adam
    gpu_step adamw_tests 45 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_adamw.py
    optional_steps
}

optional_steps() {  # the place for steps a later change adds (`step NAME LIMIT COMMAND`), on what is left
    :
}

export -f install imports make_jpegs data_rate bench model_b e2e_b step_settings_b model_l sweep_bl compile_bl \
    sweep_h ckpt_h pretrain_smoke pretrain_resume build_fused_adam
[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0  # sourced (tests): functions only
case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    dry-run) DRY=1 run ;;
    *) echo "usage: bash launch/gpu_checks.sh prepare|run|dry-run" >&2; exit 2 ;;
esac
