#!/usr/bin/env bash
# The CUDA path of mmtransnext, checked on a bare GPU machine in one call.
#
# Usage: tools/device_check.sh OUT_DIR        (or: make device-check OUT=OUT_DIR)
#
# For a machine whose Python has torch (with CUDA), numpy, opencv, pytest and hypothesis
# but no OpenMMLab package and no network: the OpenMMLab wheels travel in .whl/ (made by
# `make device-wheels` on a machine with network). Every step is time-boxed, the whole
# run within DEVICE_CHECK_BUDGET_S seconds (default 470, under 8 minutes), and its
# outcome lands in OUT_DIR/device_check.md (device, torch, CUDA, compiler, pass/fail and
# seconds per step, every figure) with the full output in OUT_DIR/device_check.log.
#
#  1 environment     GPU, driver, Python, torch, CUDA, gcc, nvcc, torch's build config
#  2 install         .whl/*.whl into /tmp/site (skipped when the caller did it already)
#  3 build-op        mmtransnext._C in place, CUDA kernels for this GPU's architecture (a
#                    later call on the same machine reuses it if the sources are unchanged)
#  4 mmcv-ops        mmcv with CUDA ops: the wheel in .whl/mmcv-ops/ (built on a CPU
#                    machine by `make device-wheels CUDA_TORCH_PYTHON=...`) when it imports and runs
#                    there, else compiled from .whl/mmcv-*.tar.gz in the background of
#                    steps 5-6 where a step that needs it runs (amp-training, detector;
#                    MMCV_BUILD=0 skips the compile)
#  5 bad-input-*     every op with bad arguments in a child process (CPU, then CUDA);
#                    after a crash, what tells its cause (faulthandler stack, whether a
#                    plain ATen error raises, which library unwinds, the .so's ldd)
#  6 tests           tests/test_ops*.py and tests/test_fused_attention_cuda.py on CUDA:
#                    window kernels and fused Triton kernels in float32/float16/bfloat16,
#                    dtype policy, golden cases, bad input (training steps: step 7);
#                    over 6 pytest-xdist workers where installed (DEVICE_CHECK_TEST_WORKERS)
#  7 amp-training    training steps under AmpOptimWrapper: Mask R-CNN in float16 (dynamic
#                    loss scale, mmdet's --amp), UperNet in bfloat16 and float16, once
#                    mmcv's ops are built (else reported skipped); whole log in
#                    OUT/pytest_amp.log
#  8 backbone        tools/benchmark_backbone.py --device cuda: default (and its step
#                    replayed from a CUDA graph, default-graphed; the key-major backward,
#                    default-two-pass, slower since the atomics are relaxed (the second
#                    and third H100 runs), is the pooled step's to time), reference and
#                    Swin-T (mmdet's where mmcv's ops
#                    from step 4 load, else timm's) side by side, fp32 and bf16
#                    autocast, forward and training step, each with the host's time to
#                    issue it; a profile of one training step per path, and the ATen
#                    operators and the host's waits on the GPU in one step (--count-ops)
#    benchmark-op    tools/benchmark_op.py --device cuda, float32, bfloat16 and float16 in
#                    one process
#    detector        tools/benchmark_detector.py: one Mask R-CNN training iteration,
#                    TransNeXt-T against Swin-T, fp32 and fp16 (mmdet's --amp)
#    pooled          tools/benchmark_pooled_attention.py: stage 1's pooled attention alone,
#                    whole-matrix against fused (key and value gradients by atomics or by
#                    a key-major pass; the bias read by taps or by slots; with and
#                    without the bias table's gradient), fp32 and bf16
#    fp32-tiles      tools/benchmark_pooled_attention.py: stages 3 and 1 in float32, the
#                    fused kernels at each launch configuration that compiles without
#                    spilling on sm_80 and sm_90 (IEEE dots on 8 and 4 warps; three-TF32
#                    dots, tf32x3, at two tile sizes; one-TF32 dots, the ceiling), and
#                    the default one with the bias read by slots, to pick float32's by
#                    measurement
#  9 compiled        tools/benchmark_backbone.py --paths default default-compiled: the
#                    training step eager and under torch.compile (Inductor), bf16 and fp32
#
# Seconds seen on an H100 (2026-11-27, third run, two calls): environment 10, install
# 9-10, build-op 56 (17 when reused), mmcv-ops-prebuilt 17-20, bad-input 15 (CPU) and 27
# (CUDA), tests 88 (6 workers; 258 tests), training steps under AMP 56, backbone 206
# (five paths), benchmark-op 22, detector 70; pooled took 55 in the second run. The
# first call (speed) took 336 s, the second (correctness) 320 s, and 164 s of the 900 s
# of device time were left. If everything does not fit one budget, a later step that
# finds the budget spent is reported skipped. DEVICE_CHECK_ONLY (below) runs a part;
# two calls that fit 900 s of device time with the machine's start:
#   DEVICE_CHECK_ONLY=mmcv,bad-input,tests,backbone,fp32   DEVICE_CHECK_BUDGET_S=560
#       (correctness first where kernels changed since the last GPU run, then the
#       speed figures and float32's launch configurations: about 400 s by the figures
#       above, the backbone step less default-two-pass's share, plus fp32-tiles, not
#       timed yet, limited to 120 s)
#   DEVICE_CHECK_ONLY=mmcv,amp-training,detector,compiled   DEVICE_CHECK_BUDGET_S=(what is left)
#       (training under AMP, Mask R-CNN against Swin-T, then torch.compile as time allows)
# The speed alone, when nothing changed in the kernels: mmcv,backbone,benchmark-op (about
# 340 s); add pooled (about 55 s) to compare the fused kernels' ways.
# Where the machine is held for a fixed time, give the second call a DEVICE_CHECK_BUDGET_S
# that fits what is left; on a machine still warm it skips the op's rebuild.
#
# The device call: run(carry=[".whl"], timeout_s=600, command=
#   'python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 bash tools/device_check.sh $OUT')
# The exit status is 0 when every step passed.
set -uo pipefail

OUT=${1:?usage: tools/device_check.sh OUT_DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
BUDGET=${DEVICE_CHECK_BUDGET_S:-470}
START=$(date +%s)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPORT=$OUT/device_check.md
LOG=$OUT/device_check.log
WORK=$(mktemp -d /tmp/device_check.XXXXXX)
: > "$LOG"
cd "$REPO" || exit 2
export PYTHONPATH=$REPO:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

ROWS=()      # "| step | result | seconds |" lines of the summary table
SECTIONS=()  # step names whose output goes into the report
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( BUDGET - $(elapsed) )); }

# DEVICE_CHECK_ONLY=word,word runs only the steps whose names start with one of the
# words (environment, install and build-op always run), e.g. a rerun of what failed.
selected() {
    local word
    [[ -z ${DEVICE_CHECK_ONLY:-} || $1 =~ ^(environment|install|build-op)$ ]] && return 0
    for word in ${DEVICE_CHECK_ONLY//,/ }; do [[ $1 == "$word"* ]] && return 0; done
    return 1
}

# run_step NAME LIMIT_S COMMAND: run COMMAND in bash within min(LIMIT_S, budget left).
run_step() {
    local name=$1 limit=$2 cmd=$3 left rc t0 result
    if ! selected "$name"; then
        ROWS+=("| $name | not selected (DEVICE_CHECK_ONLY) | 0 |")
        return 98
    fi
    left=$(( $(remaining) - 10 ))
    (( limit > left )) && limit=$left
    if (( limit < 5 )); then
        ROWS+=("| $name | skipped: time budget spent | 0 |")
        FAILED=1
        return 99
    fi
    t0=$(date +%s)
    { echo; echo "===== $name (limit ${limit}s, at $(elapsed)s) ====="; echo "\$ $cmd"; } >> "$LOG"
    timeout -k 5 "$limit" bash -c "$cmd" > "$WORK/$name.out" 2>&1
    rc=$?
    cat "$WORK/$name.out" >> "$LOG"
    case $rc in
        0) result=pass ;;
        124|137) result="TIMEOUT after ${limit}s" ;;
        *) if (( rc > 128 )); then
               result="CRASHED: signal $(kill -l $(( rc - 128 )) 2>/dev/null || echo $(( rc - 128 )))"
           else
               result="FAIL (exit $rc)"
           fi ;;
    esac
    [[ $result == pass ]] || FAILED=1
    ROWS+=("| $name | $result | $(( $(date +%s) - t0 )) |")
    SECTIONS+=("$name")
    return $rc
}

skip_step() { ROWS+=("| $1 | skipped: $2 | 0 |"); }

HAS_GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
ARCH=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)}
if [[ -z ${FORCE_CUDA:-} ]]; then  # build the CUDA kernels where a CUDA toolkit is found
    if command -v nvcc > /dev/null || [[ -n ${CUDA_HOME:-} ]]; then FORCE_CUDA=1; else FORCE_CUDA=0; fi
fi

# 1 ------------------------------------------------------------------------ environment
run_step environment 30 "
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo 'nvidia-smi: none'
$PY --version
$PY -c 'import sys, torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"GPU\", torch.cuda.is_available() and torch.cuda.get_device_name(0), \"ABI\", torch._C._GLIBCXX_USE_CXX11_ABI)'
$PY -c 'import triton; print(\"triton\", triton.__version__)' 2>&1 | tail -n 1
gcc --version | head -n 1
echo \"CC=\${CC:-} CXX=\${CXX:-} CUDAHOSTCXX=\${CUDAHOSTCXX:-}\"
nvcc --version | tail -n 2 || echo 'nvcc: none'
echo TORCH_CUDA_ARCH_LIST=$ARCH FORCE_CUDA=$FORCE_CUDA
$PY -c 'import torch; print(torch.__config__.show())'
"

# 2 ---------------------------------------------------------------------------- install
run_step install 60 "
if $PY -c 'import mmengine, mmdet, mmseg, mmcv' 2>/dev/null; then
    echo 'already importable:'; $PY -c 'import mmengine, mmdet, mmseg, mmcv; print(mmengine.__version__, mmdet.__version__, mmseg.__version__, mmcv.__version__)'
else
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    $PY -c 'import mmengine, mmdet, mmseg, mmcv; print(mmengine.__version__, mmdet.__version__, mmseg.__version__, mmcv.__version__)'
fi"

# 3 --------------------------------------------------------------------------- build-op
# A second call on a machine still warm reuses the library built from the same sources
# for the same torch, arch and flags (their hash is kept beside it).
BUILD_KEY=$(cat setup.py csrc/*.* csrc/*/* 2>/dev/null | sha256sum | cut -c1-16)-$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)-$ARCH-$FORCE_CUDA
run_step build-op 240 "
if [[ \$(cat build/.device_check_key 2>/dev/null) == '$BUILD_KEY' ]] && ls mmtransnext/_C*.so > /dev/null 2>&1; then
    echo 'reusing mmtransnext/_C built from the same sources (key $BUILD_KEY)'
else
    rm -rf build mmtransnext/_C*.so
    FORCE_CUDA=$FORCE_CUDA TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$(nproc) $PY setup.py -q build_ext --inplace 2>&1 | grep -v -E '^(copying|creating|running)' | cut -c1-300 | tail -n 30
    rc=\${PIPESTATUS[0]}
    (( rc == 0 )) || { echo \"setup.py build_ext failed (exit \$rc)\"; exit \$rc; }
    ls mmtransnext/_C*.so || exit 1
    mkdir -p build && echo '$BUILD_KEY' > build/.device_check_key
fi
# The step fails unless the library serves the CPU, and CUDA where built for a GPU present.
$PY -c 'import sys, mmtransnext.ops as o
cpu, cuda = o.extension_available(\"cpu\"), o.extension_available(\"cuda\")
print(\"compiled kernels from\", o.__file__, \": cpu\", cpu, \"cuda\", cuda)
sys.exit(0 if cpu and (cuda or not ($FORCE_CUDA and $HAS_GPU)) else 1)'
"

# 4 -------------------------------------------- mmcv's ops: prebuilt, or in the background
MMCV_SDIST=$(ls .whl/mmcv-*.tar.gz 2>/dev/null | head -n 1)
MMCV_WHEEL=$(ls .whl/mmcv-ops/mmcv-*.whl 2>/dev/null | head -n 1)
MMCV_PID=
MMCV_RC=1
# Only the training steps under AMP and the detector benchmark wait for a compile.
NEEDS_MMCV_OPS=0
if [[ $HAS_GPU == 1 ]] && { selected amp-training || selected detector; }; then
    NEEDS_MMCV_OPS=1
fi
if [[ -n $MMCV_WHEEL && $HAS_GPU == 1 ]]; then
    # A wheel built elsewhere must load against this torch and run its kernels here.
    run_step mmcv-ops-prebuilt 60 "
rm -rf /tmp/site-mmcv
$PY -m pip install -q --no-deps --no-index --no-compile --target /tmp/site-mmcv $MMCV_WHEEL || exit 1
PYTHONPATH=/tmp/site-mmcv:\$PYTHONPATH $PY -c \"import torch, mmcv, mmcv.ops
from mmcv.ops import nms, roi_align
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]], device='cuda')
kept = nms(boxes, torch.tensor([0.9, 0.8, 0.7], device='cuda'), 0.5)[1].tolist()
assert kept == [0, 2], kept
feats = torch.arange(16., device='cuda').view(1, 1, 4, 4)
rois = torch.tensor([[0., 0., 0., 3., 3.]], device='cuda')
print('mmcv', mmcv.__version__, 'from', mmcv.__file__, ': nms and roi_align ran on CUDA,',
      roi_align(feats, rois, (2, 2), 1.0, 0, 'avg', True).flatten().tolist())\"
"
    MMCV_RC=$?
fi
if [[ $MMCV_RC != 0 && $NEEDS_MMCV_OPS == 1 && ${MMCV_BUILD:-1} == 1 && -n $MMCV_SDIST
      && $FORCE_CUDA == 1 ]]; then
    MMCV_LIMIT=$(( $(remaining) - 75 ))  # what the Mask R-CNN steps need after it
    MMCV_T0=$(date +%s)
    MMCV_JOBS=${MMCV_JOBS:-$(( $(nproc) > 6 ? $(nproc) - 4 : 2 ))}  # leaves cores to steps 5-8
    (
        rm -rf /tmp/mmcv-src /tmp/mmcv-wheel /tmp/site-mmcv && mkdir -p /tmp/mmcv-src &&
        tar -xzf "$MMCV_SDIST" -C /tmp/mmcv-src &&
        cd /tmp/mmcv-src/mmcv-* &&
        MMCV_WITH_OPS=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$MMCV_JOBS \
            timeout -k 5 "$MMCV_LIMIT" $PY -m pip wheel -q --no-deps --no-index \
            --no-build-isolation -w /tmp/mmcv-wheel . &&
        $PY -m pip install -q --no-deps --no-index --no-compile --target /tmp/site-mmcv \
            /tmp/mmcv-wheel/mmcv-*.whl
    ) > "$WORK/mmcv-ops.out" 2>&1 &
    MMCV_PID=$!
fi

# 5 ------------------------------------------------------------------------- bad input
crash_diagnostics() {  # $1: cpu or cuda; each probe reports its own exit status
    local bad="torch.ops.mmtransnext.sliding_window_aggregate(torch.ones(1, 1, 4, 1, device='$1'), torch.ones(1, 1, 4, 1, device='$1'), 2, 2, 2)"
    run_step "crash-diagnostics-$1" 60 "
echo '--- 1. the same calls without C++ stack symbolisation'
TORCH_SHOW_CPP_STACKTRACES=0 TORCH_DISABLE_ADDR2LINE=1 $PY tests/bad_op_calls.py --device $1 > /dev/null 2>&1; echo exit \$?
echo '--- 2. one bad call, the library loaded by torch.ops.load_library alone (no mmtransnext, mmcv, mmengine, cv2 imports)'
$PY -X faulthandler -c \"import glob, torch
torch.ops.load_library(glob.glob('mmtransnext/_C*.so')[0])
try:
    $bad
except RuntimeError as exc:
    print('raised:', str(exc).splitlines()[0])\"; echo exit \$?
echo '--- 3. which libraries serve the C++ throw and unwind symbols (a plain ATen error, then ours), counted by library'
LD_DEBUG=bindings $PY -c \"import torch, mmtransnext.ops
try:
    torch.ones(2, 3) @ torch.ones(2, 3)
except RuntimeError:
    print('plain ATen error raised')
$bad\" 2>&1 | grep -E 'symbol .(_Unwind_RaiseException|__cxa_throw). ' | sed -E 's/.* to ([^ ]+) .*symbol .([A-Za-z_]+).*/\2 served by \1/' | sort | uniq -c
echo '--- 4. ldd of the op library'; ldd mmtransnext/_C*.so
echo '--- 5. environment'; env | grep -E '^(LD_PRELOAD|LD_LIBRARY_PATH|TORCH_SHOW_CPP_STACKTRACES|TORCH_DISABLE_ADDR2LINE)=' || true
echo '--- 6. unwinders, C++ runtimes and OpenMP runtimes loaded with mmtransnext'
$PY -c \"import torch, mmtransnext.ops
print(''.join(sorted({l.split()[-1] + chr(10) for l in open('/proc/self/maps') if any(k in l for k in ('unwind', 'gcc_s', 'stdc++', 'gomp', 'omp'))})))\"
echo '--- 7. the same bad call with the library built on a CPU machine (.whl/diag/: gcc 12, the index torch wheel): a pass here and a crash in 2 point at this machine s compiler'
for lib in .whl/diag/_C*.so; do
    [[ -f \$lib ]] || { echo 'no prebuilt library in .whl/diag'; break; }
    $PY -X faulthandler -c \"import torch
torch.ops.load_library('\$lib')
try:
    $bad
except RuntimeError as exc:
    print('raised:', str(exc).splitlines()[0])\"; echo exit \$?
done
"
}
# After a crash (or always, with DEVICE_CHECK_DIAGNOSE=1).
bad_input() {
    run_step "bad-input-$1" 60 "$PY tests/bad_op_calls.py --device $1 --kind raw"
    local rc=$?
    if (( rc > 128 && rc != 137 )) || [[ ${DEVICE_CHECK_DIAGNOSE:-0} == 1 ]]; then
        crash_diagnostics "$1"
    fi
}
bad_input cpu
if [[ $HAS_GPU == 1 ]]; then
    bad_input cuda
else
    skip_step bad-input-cuda 'no CUDA device'
fi

# 6 ------------------------------------------------------------------------------ tests
# The CPU-only tests of tests/test_ops.py are CI's; its CUDA ones run here.
# The whole pytest output goes to OUT/pytest_cuda.log, with a line per test whatever its
# outcome (-rA); the report keeps the failures' one-line summaries and the skip reasons.
# pytest-xdist, where installed, spreads the tests over worker processes sharing the GPU.
WORKERS=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n ${DEVICE_CHECK_TEST_WORKERS:-6}")
run_step tests 200 "set -o pipefail
$PY -m pytest $WORKERS tests/test_ops_bad_input.py tests/test_ops_cuda.py tests/test_fused_attention_cuda.py tests/test_ops.py -q -rA --durations=15 --tb=short -p no:cacheprovider -k 'not amp_training_step and (cuda or not test_ops.py)' 2>&1 | tee $OUT/pytest_cuda.log | grep -E '^(FAILED|ERROR|SKIPPED|[0-9]+ (passed|failed)|[0-9.]+s (call|setup|teardown) )' | cut -c1-400 | tail -n 80"

# 7 ------------------------------------------------------------ training steps under AMP
if [[ $MMCV_RC == 0 ]]; then
    :  # the prebuilt wheel ran (step 4)
elif [[ -n $MMCV_PID ]]; then
    wait "$MMCV_PID"
    MMCV_RC=$?
    MMCV_S=$(( $(date +%s) - MMCV_T0 ))
    { tail -n 40 "$WORK/mmcv-ops.out"
      echo "objects compiled: $(find /tmp/mmcv-src -name '*.o' | wc -l) of" \
           "$(find /tmp/mmcv-src/*/mmcv/ops/csrc/pytorch -name '*.cpp' -o -name '*.cu' | wc -l) sources"
    } > "$WORK/mmcv-ops.tail"
    { echo; echo "===== mmcv-ops (background, ${MMCV_S}s, exit $MMCV_RC) ====="; cat "$WORK/mmcv-ops.out"; } >> "$LOG"
    if [[ $MMCV_RC == 0 ]]; then
        ROWS+=("| mmcv-ops (background) | pass | $MMCV_S |")
    else
        ROWS+=("| mmcv-ops (background) | FAIL or TIMEOUT (exit $MMCV_RC) | $MMCV_S |")
        FAILED=1
    fi
elif [[ $NEEDS_MMCV_OPS == 0 ]]; then
    skip_step 'mmcv-ops (background)' 'no GPU, or neither amp-training nor detector selected'
else
    skip_step 'mmcv-ops (background)' 'MMCV_BUILD=0, no nvcc, or no .whl/mmcv-*.tar.gz'
fi
# Where mmcv's CUDA ops loaded, the steps that import mmdet's models take them first.
MMCV_ENV=
[[ $MMCV_RC == 0 ]] && MMCV_ENV='PYTHONPATH=/tmp/site-mmcv:$PYTHONPATH '
if [[ $HAS_GPU != 1 ]]; then
    skip_step amp-training 'no CUDA device'
elif [[ $MMCV_RC != 0 ]] && selected amp-training; then
    skip_step amp-training 'mmcv with CUDA ops was not built in time (see mmcv-ops)'
    FAILED=1
else
    run_step amp-training 120 "set -o pipefail; ${MMCV_ENV}$PY -m pytest ${WORKERS:+-n 3} tests/test_ops_cuda.py -q -rA --tb=short -p no:cacheprovider -p no:warnings -k amp_training_step 2>&1 | tee $OUT/pytest_amp.log | tail -n 60"
fi

# 8 ------------------------------------------------------------------------ benchmarks
# The whole backbone, the op and the detector first: the figures users compare.
if [[ $HAS_GPU == 1 ]]; then
    # The fused paths first: a run stopped at its limit keeps the rows printed so far.
    run_step backbone 270 "${MMCV_ENV}$PY tools/benchmark_backbone.py --device cuda --arch tiny --size 800 1333 --batch 2 --dtypes fp32 bf16 --paths default default-graphed reference swin --repeats 3 --warmup 1 --profile 12 --count-ops"
    run_step benchmark-op 75 "$PY tools/benchmark_op.py --device cuda --repeats 10 --dtype float32 bfloat16 float16 --profile 8"
    if [[ $MMCV_RC == 0 ]] || ! selected detector; then
        run_step detector 90 "${MMCV_ENV}$PY tools/benchmark_detector.py --device cuda --batch 2 --dtypes fp32 fp16"
    else
        skip_step detector 'mmcv with CUDA ops is missing (see mmcv-ops)'
    fi
    # The fused kernels' ways: key and value gradients by atomics or a key-major pass, the
    # bias read by taps or by slots (bf16; fp32 keeps taps), and without the bias table's
    # gradient (fused-fixed-bias), to see what each costs.
    run_step pooled 120 "$PY tools/benchmark_pooled_attention.py --device cuda --stage 1 --batch 2 --dtypes bf16 --repeats 5 --warmup 2 --paths whole fused fused-fixed-bias --backward atomic two-pass --bias-tile taps slots && $PY tools/benchmark_pooled_attention.py --device cuda --stage 1 --batch 2 --dtypes fp32 --repeats 5 --warmup 2 --paths whole fused fused-fixed-bias --backward atomic two-pass"
    # Float32's launch configuration: its step is the fused kernels' (their backward the
    # most), whose dots are IEEE multiply-adds on CUDA cores. Stage 3 holds 15 of
    # TransNeXt-T's 21 attention layers, stage 1 the largest maps.
    # Then the default tile with the bias read by slots, which the dispatcher keeps from
    # float32 (see fused_attention.BIAS_TILE).
    run_step fp32-tiles 120 "for stage in 3 1; do $PY tools/benchmark_pooled_attention.py --device cuda --stage \$stage --batch 2 --dtypes fp32 --repeats 5 --warmup 2 --paths fused --tiles 32x32x8 32x16x4 32x16x8:tf32x3 16x16x4:tf32x3 32x16x8:tf32 && $PY tools/benchmark_pooled_attention.py --device cuda --stage \$stage --batch 2 --dtypes fp32 --repeats 5 --warmup 2 --paths fused --bias-tile slots || exit; done"
else
    for name in backbone detector pooled fp32-tiles benchmark-op; do skip_step $name 'no CUDA device'; done
fi

# 9 ---------------------------------------------------------------------- torch.compile
# The default path compiled (Inductor, the fused attention cores between the graphs)
# against eager, bfloat16 autocast training step: the step whose host sets its pace.
if [[ $HAS_GPU == 1 ]]; then
    run_step compiled 240 "$PY tools/benchmark_backbone.py --device cuda --arch tiny --size 800 1333 --batch 2 --dtypes bf16 fp32 --modes train --paths default default-compiled --repeats 3 --warmup 2"
else
    skip_step compiled 'no CUDA device'
fi

# ----------------------------------------------------------------------------- report
{
    echo "# mmtransnext device check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo '```'
    head -n 9 "$WORK/environment.out" 2>/dev/null
    echo '```'
    echo
    echo "Total $(elapsed) s of a ${BUDGET} s budget; overall: $([[ $FAILED == 0 ]] && echo PASS || echo FAIL)."
    [[ -n $MMCV_PID ]] && echo "mmcv's ops compiled in the background ($MMCV_JOBS jobs on $(nproc) cores) while steps 5-6 ran: their timings share the CPU with it."
    echo
    echo '| step | result | seconds |'
    echo '|---|---|---|'
    printf '%s\n' "${ROWS[@]}"
    for name in "${SECTIONS[@]}"; do
        [[ $name == environment ]] && continue
        echo
        echo "## $name"
        echo
        echo '```'
        tail -n 160 "$WORK/$name.out"
        echo '```'
    done
    if [[ -f $WORK/mmcv-ops.tail ]]; then
        echo
        echo '## mmcv-ops (background build of mmcv with CUDA ops)'
        echo
        echo '```'
        cat "$WORK/mmcv-ops.tail"
        echo '```'
    fi
} > "$REPORT"
rm -rf "$WORK"
echo "report: $REPORT"
cat "$REPORT"
exit $FAILED
