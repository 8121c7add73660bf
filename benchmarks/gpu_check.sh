#!/usr/bin/env bash
# One command for a CUDA machine (H100/H200; torch, triton, timm, transformers, torchvision installed):
#   bash benchmarks/gpu_check.sh            # results under $OUT (default /tmp/swin_gpu_check)
# 1. the ops parity tests on the GPU (fp32 and bf16, forward and backward, every Triton launch
# configuration; backend "fused" in its own time box), 2. Swin-T 224 bf16 inference b256, ours (also
# "fused") vs the best peers, compiled and eager; the kernels alone per configuration
# (benchmarks/kernel_bench.py: us per call and GB/s at each stage); the training step b128 with peak
# memory, 3. a profile of ours' compiled training step, 4. if time is left: latency b1, Swin-B and
# SwinV2-T against timm / torchvision / HF.
# Each section is separate and time-boxed: a failure is
# logged and the rest still runs. Whole script: < 9.5 minutes. A short table is printed last.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/swin_inductor_cache}"
OUT="${OUT:-/tmp/swin_gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${BUDGET_S:-570}"   # seconds for the whole script (the device tool allows 600 per call)
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
section() {  # section NAME MAX_SECONDS CMD... ; runs CMD with a timeout of min(MAX, time left - reserve)
  local name="$1" max="$2"; shift 2
  local t=$(( $(left) - 15 )); [ "$t" -gt "$max" ] && t="$max"
  if [ "$t" -lt 20 ]; then echo "[$name] skipped: $(left)s left" | tee -a "$OUT/sections.txt"; return; fi
  local s=$(date +%s)
  timeout -k 5 "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc in $(( $(date +%s) - s ))s (limit ${t}s)" | tee -a "$OUT/sections.txt"
  tail -n 3 "$OUT/$name.log"
}

{ date; nvidia-smi; "$PY" -c "import torch, triton, timm, transformers, torchvision; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
tail -n 1 "$OUT/env.txt"

# 1. parity on the GPU (the CUDA parametrisations run because a GPU is present)
# (Triton under torch.compile is exercised by the bench's ours+compile entries instead of a test here)
section parity 140 "$PY" -m pytest tests/test_ops.py -q -p no:cacheprovider -rfE \
  -k "(cuda or whole_model) and not under_torch_compile and not fused" --junitxml="$OUT/parity.xml"
# backend "fused" (new in stop 10, never run on a GPU): its own time box, so that its compilations
# cannot cost the section above its results
section parity_fused 60 "$PY" -m pytest tests/test_ops.py -q -p no:cacheprovider -rfE \
  -k "fused and cuda" --junitxml="$OUT/parity_fused.xml"

# 2. Swin-T 224, bf16 autocast: ours (auto = Triton kernels) vs peers, eager and compiled. Entries are
# prepared in this order and compiled ones are skipped past the budget: the decisive pairs come first
# (ours vs the best peer, eager and compiled; ours+compile = the Triton kernels inside the graph;
# ours-fused: backend "fused", stage 1's block halves as one kernel each, not yet timed).
B="$PY benchmarks/bench.py --device cuda --dtype bf16 --rounds 5 --iters 8 --warmup 3"
section t_infer 140 $B --models swin_t --modes infer --budget-s 105 --out "$OUT/t_infer" \
  --impls ours,timm+compile,ours+compile,ours-fused+compile,ours-fused,timm-sdpa
# the two kernels alone at Swin-T's stage shapes, every launch configuration (and backend "fused"'s two
# halves against separate calls at stage 1): us per call, GB/s moved
section kernels 60 "$PY" benchmarks/kernel_bench.py --batch 256 --out "$OUT/kernels.md"
section t_train 130 $B --models swin_t --modes train --budget-s 100 --out "$OUT/t_train" \
  --impls ours,timm-sdpa+compile,ours+compile,timm

# 3. where a compiled training step's time goes (torch.profiler, kernels by group; stop 9 profiled
# compiled inference: matmul 32%, window attention 28%, norm 17%)
section profile 60 "$PY" benchmarks/gpu_profile.py --device cuda --impls ours+compile --modes train \
  --steps 3 --out "$OUT/profile"

# 4. if time is left: latency (met in stops 6 and 9), Swin-B and SwinV2-T eager
section t_latency 40 $B --models swin_t --modes latency --iters 20 --out "$OUT/t_latency" \
  --impls ours+graph,ours-fused+graph,ours,timm-sdpa
section bv2 100 $B --models swin_b,swinv2_t_w8 --modes infer,train --batch-infer 128 --batch-train 64 --iters 5 \
  --rounds 3 --budget-s 70 --out "$OUT/bv2" --impls ours,timm,tv,hf

# short table last
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); rows = []
for f in sorted(out.glob("*/bench.json")):
    for e in json.loads(f.read_text())["entries"]:
        rows.append(e)
md = ["| model | mode | batch | impl | median | unit | vs best peer | paired | peak GiB | mem vs timm | saved GiB | parity |", "|" + "---|" * 12]
for e in rows:
    fmt = lambda v, p=2: "" if v is None else f"{v:.{p}f}"
    md.append(f"| {e['model']} | {e['mode']} | {e['batch']} | {e['impl']} | "
              f"{fmt(e['median']) if e['median'] else (e['error'] or '')[:60]} | {e['unit']} | {fmt(e['vs_best_peer'])} | {fmt(e.get('paired_vs_best_peer'))} | "
              f"{fmt(e['peak_gib'])} | {fmt(e['mem_vs_timm'])} | {fmt(e.get('saved_gib'))} | {'' if e['parity_rel_err'] is None else '%.1e' % e['parity_rel_err']} |")
md.append("\nTriton launch configurations chosen (swin.ops.triton_window.choices()):")
for f in sorted(out.glob("*/bench.json")):
    for c in json.loads(f.read_text()).get("triton_configs", []):
        md.append(f"- {f.parent.name}: {c['kind']} {c['signature']} -> {c['config']}")
(out / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PYEOF
cat "$OUT/sections.txt"
echo "total $(( $(date +%s) - T0 ))s; results in $OUT"
