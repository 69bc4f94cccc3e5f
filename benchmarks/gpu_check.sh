#!/usr/bin/env bash
# The GPU check, as one time-boxed script for a borrowed GPU machine:
#   bash benchmarks/gpu_check.sh OUT_DIR DATA_DIR [BUDGET_S]
# 1. a smoke run of the trainer on CUDA (bf16, cpu_test.yaml) - if it fails, the rest is pointless
#    and only tests/training/test_devices.py runs, for the diagnosis;
# 2. the recipe selection (benchmarks/select_recipe.py, SPEC, default benchmarks/recipes/lstm_gpu.yaml:
#    every candidate x seeds 0-2 at once, sharing the GPU), with tests/training/test_devices.py beside it;
# 3. the precision sweep (benchmarks/run.py --device $device --quick: trainer vs in-memory floor at
#    batch 256/1024/4096 in fp32, bf16, fp16), alone on the GPU since it is timed;
# 4. benchmarks/conv_speed.py: the convolutional models' samples/s against the plain LSTM;
# 5. everything small that the runs wrote, and the chosen weights, packed into OUT_DIR/runs.tgz.
# BUDGET_S (default 500) bounds steps 1-4: the selection gets what the others leave.
# DEVICE=cpu and SELECT_EXTRA='--extra train.max_steps=20 --extra eval.every_steps=10' rehearse it on a CPU machine.
set -u
out=${1:?usage: gpu_check.sh OUT_DIR DATA_DIR [BUDGET_S]}
data=${2:?usage: gpu_check.sh OUT_DIR DATA_DIR [BUDGET_S]}
budget=${3:-500}
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
work=${WORK:-/tmp/gpu-check}
device=${DEVICE:-cuda}
mkdir -p "$out" "$work"
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
step() { echo "=== $* ($((SECONDS - start)) s in)"; }

step "smoke: cpu_test.yaml on $device, bf16"
timeout 120 "$py" launch/train.py --config configs/cpu_test.yaml "data.dir=$data" "output_dir=$work/smoke" \
  train.device=$device train.mixed_precision=bf16 wandb.mode=disabled train.progress_bar=false > "$work/smoke.log" 2>&1
smoke=$?
tail -5 "$work/smoke.log"
if [ $smoke -ne 0 ]; then
  echo "smoke run failed (exit $smoke): only tests/training/test_devices.py runs now"
  timeout $(( $(left) > 60 ? $(left) : 60 )) "$py" -m pytest -x -q tests/training/test_devices.py > "$out/test_devices.log" 2>&1
  tail -30 "$out/test_devices.log"
  cp "$work/smoke.log" "$out/"
  exit 1
fi

bench_s=210  # the precision sweep, then benchmarks/conv_speed.py
step "recipe selection, with tests/training/test_devices.py beside it"
timeout 300 "$py" -m pytest -q tests/training/test_devices.py > "$out/test_devices.log" 2>&1 &
tests=$!
"$py" benchmarks/select_recipe.py --spec "${SPEC:-benchmarks/recipes/lstm_gpu.yaml}" --data "$data" --work "$work/select" \
  --out "$out/selection.json" --device $device --seeds 0,1,2 --parallel 16 --deadline-s $(( $(left) - bench_s - 20 )) ${SELECT_EXTRA:-}
wait $tests; echo "tests/training/test_devices.py exit $?"; tail -3 "$out/test_devices.log"

step "precision sweep (quick), alone on the GPU"
timeout $(( $(left) - 90 > 30 ? $(left) - 90 : 30 )) "$py" benchmarks/run.py --device $device --quick --sections precision \
  --data "$data" --out "$out/$device-quick.json" 2>&1 | tail -25

step "convolutional models against the plain LSTM, samples/s"
timeout 90 "$py" benchmarks/conv_speed.py --device $device --out "$out/conv-speed-$device.json" 2>&1 | tail -12

step "packing"
# The chosen candidate's weights come back too: scoring them again on the CPU (launch/evaluate.py)
# shows whether a model trained on the GPU keeps its accuracy elsewhere.
winner=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1])).get('winner') or '')" "$out/selection.json" 2>/dev/null)
(cd "$work" && { find . \( -name metrics.jsonl -o -name summary.json -o -name '*.log' -o -name config.json \) -print0
  [ -n "$winner" ] && find select -path "select/$winner-seed*/model/model.safetensors" -print0; } \
  | tar czf "$out/runs.tgz" --null -T -)
ls -la "$out"
step "done"
