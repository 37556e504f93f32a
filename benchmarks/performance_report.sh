#!/usr/bin/env bash
# Every measurement of docs/performance.md, in sequence. Run it on quiet cores (nothing else
# training or sampling), from a checkout after `make install`:
#
#     benchmarks/performance_report.sh OUT_DIR
#     SECTIONS="profile busy" benchmarks/performance_report.sh OUT_DIR   # only these sections
#
# Expected duration on this project's 2-core CPU: about 45 minutes (run 1 took 32 without section 6b; the estimate of each section
# is printed before it runs). Each section has a time limit, so a slow machine cannot run away:
# worst case about 85 minutes (the sum of the limits), with whatever rows a cut section had printed kept in its .md file.
# OUT_DIR gets: env.txt (uptime first, then machine and versions), one SECTION.md (the markdown
# table, printed as it goes) + SECTION.json (raw results) + SECTION.err per section, and log.txt.
#
# What is cut to fit, and why:
# - The paper's shapes at batch 64, and GPT-XL: one batch of 64 GPT-B images takes minutes on
#   2 cores. GPT-B at batch 8 (CTF beside the baseline in bfloat16 and int8-fbgemm; the float32
#   baseline beside LlamaGen alone, CTF in float32 adding three minutes), GPT-B and GPT-L at
#   batch 1 in int8-fbgemm.
# - Paper shapes skip the VQ decode (--no-decode): it is the same for both methods.
# - LlamaGen's sampler is timed over the first 32 decode steps of each image and scaled to the
#   whole image: all its steps cost the same (it attends over the whole cache at every step),
#   and a whole GPT-B image takes about a minute.
# - int8 through torchao is not timed at the paper's shapes: in eager mode it is slower than
#   float32 on this CPU (the matmul table shows why); it is timed on the shipped models and
#   compiled in the compile section.
# - Quality: 2 seeds of 5000 samples per model for float32, bfloat16 and int8-fbgemm (the int8
#   that is fast here, and with one activation scale per batch the riskier one); torchao's int8
#   and int8-weight get the held-out bits/token, scored on 5000 of the 10000 test images.
set -u
OUT=${1:?usage: benchmarks/performance_report.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
CTFGEN=${CTFGEN:-.venv/bin/ctfgen}
PY=${PY:-.venv/bin/python}

{
  echo "uptime: $(uptime)"
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | head -1 | grep -q . && echo '(with local changes)')"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p') x $(nproc) cores; flags: $(grep -o -w -E 'avx512_bf16|avx512_vnni|amx_bf16|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo "memory: $(free -g | awk '/Mem:/ {print $2 " GiB"}')"
  $PY -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'threads', torch.get_num_threads())"
  $PY -c "import torchao; print('torchao', torchao.__version__)" 2>/dev/null || echo "torchao: not installed (pip install 'ctfgen[quant]')"
  echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-unset} GOMP_SPINCOUNT=${GOMP_SPINCOUNT:-unset} (the ctfgen command sets GOMP_SPINCOUNT=3000 when neither is set)"
} | tee "$OUT/env.txt"

section() {  # section NAME EXPECTED_S LIMIT_S ctfgen-arguments...
  local name=$1 expected=$2 limit=$3
  shift 3
  if [ -n "${SECTIONS:-}" ] && [[ " $SECTIONS " != *" $name "* ]]; then return; fi
  echo "== $name: about ${expected} s (limit ${limit} s): ctfgen $*" | tee -a "$OUT/log.txt"
  local start=$(date +%s)
  timeout "$limit" "$CTFGEN" "$@" --json "$OUT/$name.json" > "$OUT/$name.md" 2> "$OUT/$name.err"
  local rc=$?
  echo "   exit $rc after $(( $(date +%s) - start )) s$([ $rc = 124 ] && echo ' (cut at its limit)')  uptime: $(uptime)" | tee -a "$OUT/log.txt"
  cat "$OUT/$name.md"
}

# 1. Where a decode step's time goes: GPT-B, batch 8, guidance 2.0.
section profile 100 240 bench --profile --models GPT-B --batch-sizes 8 --cfg-scale 2.0 \
  --dtype float32 bfloat16 int8-fbgemm --threads 2

# 1b. What each speed-up of the decode step gives, against what it replaced.
section speedups 60 150 bench --speedups --models GPT-B --batch-sizes 8 --cfg-scale 2.0 --dtype float32 bfloat16 --threads 2

# 2. The targets: GPT-B at batch 8 beside LlamaGen's sampler, each pair in one run; with CTF beside
#    the baseline in bfloat16 and int8 (CTF/baseline against the paper's Table 2).
section gpt_b_float32 140 300 bench --models GPT-B --batch-sizes 8 --no-decode --cfg-scale 2.0 \
  --dtype float32 --methods baseline --llamagen --llamagen-steps 32 --repeats 5 --warmup 0 --threads 2
section gpt_b_batch8 250 600 bench --models GPT-B --batch-sizes 8 --no-decode --cfg-scale 2.0 \
  --dtype bfloat16 int8-fbgemm --llamagen --llamagen-steps 32 --repeats 5 --warmup 0 --threads 2

# 3. The machine's matrix multiply per precision (the ceiling for the linear layers).
section matmul 40 120 bench --matmul --dtype float32 bfloat16 int8 int8-weight int8-fbgemm --threads 2

# 4. A busy machine: a busy loop on one core, started and stopped by the benchmark.
section busy 150 360 bench --busy --models fashion-mnist GPT-B --dtype bfloat16 --repeats 2

# 5. The shipped models at batch 1, 8 and 64, every precision, with LlamaGen's sampler beside the
#    baseline, on the threads the ctfgen command would use (one: they are small).
section shipped 150 300 bench --models fashion-mnist --batch-sizes 1 8 64 \
  --dtype float32 bfloat16 int8 int8-weight int8-fbgemm --llamagen --repeats 5 --warmup 1 --threads auto

# 6. Quality per precision: FD and class consistency of 5000 samples per seed (float32, bfloat16 and
#    int8-fbgemm), held-out bits/token of 5000 test images for every precision.
section quality 450 900 bench --quality --models fashion-mnist fashion-mnist-baseline \
  --dtype float32 bfloat16 int8-fbgemm int8 int8-weight --sample-dtype float32 bfloat16 int8-fbgemm \
  --seeds 0 1 --per-class 500 --test-images 5000 --threads 2

# 6b. Samples of torchao's int8 and int8-weight (slow in eager mode here, so a section of their own).
section quality_torchao 600 1500 bench --quality --models fashion-mnist fashion-mnist-baseline \
  --dtype float32 int8 int8-weight --sample-dtype int8 int8-weight --seeds 0 1 --per-class 500 --test-images 5000 --threads 2

# 7. CTF/baseline at GPT-B's and GPT-L's shapes (the 343M aux) at batch 1, against the paper's Table 2,
#    in int8-fbgemm (the fastest here; GPT-L in bfloat16 would take four minutes more).
section paper_batch1 130 360 bench --models GPT-B GPT-L --batch-sizes 1 --no-decode --cfg-scale 2.0 \
  --dtype int8-fbgemm --repeats 5 --warmup 0 --threads 2

# 8. torch.compile of the decode step, eager against compiled (the first call compiles).
section compile 100 240 bench --compile --models fashion-mnist --batch-sizes 8 --dtype float32 int8 \
  --repeats 5 --threads 1

echo "done: $(uptime)" | tee -a "$OUT/log.txt"
