#!/usr/bin/env bash
# The GPU check, as one time-boxed script for a borrowed GPU machine:
#   bash benchmarks/gpu_check.sh OUT_DIR DATA_DIR [BUDGET_S]
# 1. a smoke run of the trainer on CUDA (bf16, cpu_test.yaml) - if it fails, the rest is pointless
#    and only tests/training/test_devices.py runs, for the diagnosis;
# 2. the recipe comparison (launch/tune.py over the candidates of SPEC, default benchmarks/recipes/lstm_gpu.yaml:
#    the candidates at once on the GPU, then the winner with seeds 0-2 at once), with
#    tests/training/test_devices.py beside it;
# 3. the precision sweep (benchmarks/run.py --device $device --quick: trainer vs in-memory floor at
#    batch 256/1024/4096 in fp32, bf16, fp16), alone on the GPU since it is timed;
# 4. benchmarks/conv_speed.py: the convolutional models' samples/s against the plain LSTM;
# 5. everything small that the runs wrote, and the chosen weights, packed into OUT_DIR/runs.tgz.
# BUDGET_S (default 500) bounds steps 1-4: the selection gets what the others leave.
# DEVICE=cpu and TUNE_EXTRA='train.max_steps=20 eval.every_steps=10' rehearse it on a CPU machine.
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
step "recipe comparison, with tests/training/test_devices.py beside it"
timeout 300 "$py" -m pytest -q tests/training/test_devices.py > "$out/test_devices.log" 2>&1 &
tests=$!
# The study's time box stops its runs, each with a checkpoint, and writes trials.csv (the winner's final runs
# come after it, when the candidates end in time); SIGTERM 30 s later stops whatever is still going.
tune_s=$(( $(left) - bench_s - 20 ))
timeout -s TERM $tune_s "$py" launch/tune.py --config configs/fashion_mnist_best.yaml \
  "data.dir=$data" train.device=$device wandb.mode=disabled train.progress_bar=false ${TUNE_EXTRA:-} \
  --space "${SPEC:-benchmarks/recipes/lstm_gpu.yaml}" --workers 3 --folds 1 --pruner none --dir "$work/select" \
  --timeout $(( tune_s - 30 )) > "$out/tune.log" 2>&1
echo "launch/tune.py exit $?"; tail -6 "$out/tune.log"
cp "$work/select/study.json" "$work/select/trials.csv" "$work/select/final.json" "$out/" 2>/dev/null
true
wait $tests; echo "tests/training/test_devices.py exit $?"; tail -3 "$out/test_devices.log"

step "precision sweep (quick), alone on the GPU"
timeout $(( $(left) - 90 > 30 ? $(left) - 90 : 30 )) "$py" benchmarks/run.py --device $device --quick --sections precision \
  --data "$data" --out "$out/$device-quick.json" 2>&1 | tail -25

step "convolutional models against the plain LSTM, samples/s"
timeout 90 "$py" benchmarks/conv_speed.py --device $device --out "$out/conv-speed-$device.json" 2>&1 | tail -12

step "packing"
# The chosen candidate's weights come back too: scoring them again on the CPU (launch/evaluate.py)
# shows whether a model trained on the GPU keeps its accuracy elsewhere.
winner=$("$py" -c "import json,sys; print('trial-%04d' % json.load(open(sys.argv[1]))['trial'])" "$out/final.json" 2>/dev/null)
(cd "$work" && { find . \( -name metrics.jsonl -o -name summary.json -o -name '*.log' -o -name config.json \) -print0
  [ -n "$winner" ] && find select -path "select/final/$winner/seed-*/model/model.safetensors" -print0; } \
  | tar czf "$out/runs.tgz" --null -T -)
ls -la "$out"
step "done"
