#!/usr/bin/env bash
# One GPU check, about 8 minutes on one GPU: the environment, tools/bench.py rows against the
# textbook step, a 3-minute `python main.py` with the defaults, evaluate.py on 1,000 held-out
# sequences, and torchrun over every GPU when there are several. Writes JSON files and
# DIR/summary.md (a markdown table for the README).
#
#   tools/gpu_check.sh [--out DIR] [--data-root DIR]   # on a GPU box (MNIST is downloaded)
#   tools/gpu_check.sh --smoke [--out DIR]              # the same steps on the CPU, tiny sizes
#
# A step that fails is recorded in DIR/failed.txt and the check goes on.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0 out=gpu_check data=data/mnist
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --out) out=$2; shift ;;
    --data-root) data=$2; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 1 ;;
  esac
  shift
done
mkdir -p "$out" && : > "$out/failed.txt" || { echo "error: can't write in --out $out" >&2; exit 1; }
py=${PYTHON:-python}

step() {  # step NAME COMMAND...: run it with a log, note a failure, go on
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "$out/$name.log" 2>&1 || { echo "$name (exit $?): see $name.log" >> "$out/failed.txt"; tail -5 "$out/$name.log"; }
}

if [ $smoke = 1 ]; then
  archs=tiny batches="2" device=cpu
  size=(--image-size 16 --frames-input 2 --frames-output 2 --repeats 1 --warmup 1)
  train=(--arch tiny --epoch-size 8 --batch-size 2 --val-size 4 --frames-input 2 --frames-output 2
         --time-budget 0.05 --workers 0 --no-download)
  score=(--num 8)
else
  archs="convlstm convgru" batches="4 16" device=cuda
  size=(--repeats 5 --warmup 2)
  train=(--time-budget 3)
  score=(--num 1000)
fi

step env "$py" -c "
import json, sys, torch
cuda = torch.cuda.is_available()
props = torch.cuda.get_device_properties(0) if cuda else None
json.dump({'torch': torch.__version__, 'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(),
           'python': sys.version.split()[0], 'gpus': torch.cuda.device_count(),
           'gpu': props.name if cuda else None,
           'gpu_memory_gib': round(props.total_memory / 2**30, 1) if cuda else None,
           'bf16': cuda and torch.cuda.is_bf16_supported()}, open('$out/env.json', 'w'), indent=2)"

for arch in $archs; do
  for b in $batches; do
    common=(--arch "$arch" --batch-size "$b" --device "$device" "${size[@]}")
    # fp32 (TF32 as torch defaults) and bf16, with the textbook step they are compared with
    step "bench_${arch}_b${b}" "$py" tools/bench.py "${common[@]}" --amp none,bf16 \
      --json "$out/bench_${arch}_b${b}.json"
    step "bench_${arch}_b${b}_cl" "$py" tools/bench.py "${common[@]}" --amp bf16 --channels-last \
      --no-reference --json "$out/bench_${arch}_b${b}_cl.json"
    step "bench_${arch}_b${b}_compile" "$py" tools/bench.py "${common[@]}" --amp bf16 --compile \
      --no-reference --json "$out/bench_${arch}_b${b}_compile.json"
  done
done

step train "$py" main.py --device "$device" --data-root "$data" --out-dir "$out/run" "${train[@]}"
step evaluate "$py" evaluate.py --checkpoint "$out/run/checkpoints/last.pt" --device "$device" \
  "${score[@]}" --json "$out/evaluate.json"

gpus=$("$py" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ $smoke = 0 ] && [ "$gpus" -gt 1 ]; then
  step torchrun "$py" -m torch.distributed.run --standalone --nproc_per_node="$gpus" main.py \
    --data-root "$data" --out-dir "$out/ddp" --time-budget 1 --no-download
fi

"$py" tools/gpu_summary.py "$out" > "$out/summary.md"
cat "$out/summary.md"
[ ! -s "$out/failed.txt" ] || { echo "failed steps:"; cat "$out/failed.txt"; exit 1; }
