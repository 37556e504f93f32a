#!/usr/bin/env bash
# Every measurement of docs/performance.md, in sequence. Run it on quiet cores (nothing else
# training or sampling), from a checkout after `make install`:
#
#     benchmarks/performance_report.sh OUT_DIR
#
# Expected duration on this project's 2-core CPU: about 25 minutes (the estimate of each section
# is printed before it runs). Each section has a time limit, so a slow machine cannot run away:
# worst case about 45 minutes, with whatever rows a cut section had printed kept in its .md file.
# OUT_DIR gets: env.txt (uptime first, then machine and versions), one SECTION.md (the markdown
# table, printed as it goes) + SECTION.json (raw results) + SECTION.err per section, and log.txt.
#
# What is cut to fit, and why:
# - The paper's shapes at batch 64, and GPT-XL: one batch of 64 GPT-B images takes minutes on
#   2 cores. GPT-B at batch 8 (every precision), GPT-L at batch 1 in bfloat16 (auto here) only.
# - Paper shapes skip the VQ decode (--no-decode): it is the same for both methods.
# - LlamaGen's sampler is timed over the first 32 decode steps of each image and scaled to the
#   whole image: all its steps cost the same (it attends over the whole cache at every step),
#   and a whole GPT-B image takes about a minute.
# - int8 through torchao is not timed at the paper's shapes: in eager mode it is slower than
#   float32 on this CPU (the matmul table shows why); it is timed on the shipped models and
#   compiled in the compile section.
# - Quality: 2 seeds of 5000 samples per model and precision.
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
  echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-unset} (the ctfgen command sets PASSIVE when unset)"
} | tee "$OUT/env.txt"

section() {  # section NAME EXPECTED_S LIMIT_S ctfgen-arguments...
  local name=$1 expected=$2 limit=$3
  shift 3
  echo "== $name: about ${expected} s (limit ${limit} s): ctfgen $*" | tee -a "$OUT/log.txt"
  local start=$(date +%s)
  timeout "$limit" "$CTFGEN" "$@" --json "$OUT/$name.json" > "$OUT/$name.md" 2> "$OUT/$name.err"
  local rc=$?
  echo "   exit $rc after $(( $(date +%s) - start )) s$([ $rc = 124 ] && echo ' (cut at its limit)')  uptime: $(uptime)" | tee -a "$OUT/log.txt"
  cat "$OUT/$name.md"
}

# 1. Where a decode step's time goes: GPT-B, batch 8, guidance 2.0.
section profile 100 420 bench --profile --models GPT-B --batch-sizes 8 --cfg-scale 2.0 \
  --dtype float32 bfloat16 int8-fbgemm --threads 2

# 1b. What each speed-up of the decode step gives, against what it replaced.
section speedups 60 300 bench --speedups --models GPT-B --batch-sizes 8 --cfg-scale 2.0 --dtype float32 bfloat16 --threads 2

# 2. The targets: GPT-B at batch 8 beside LlamaGen's sampler, each pair in one run (and CTF with it).
section gpt_b_batch8 550 1000 bench --models GPT-B --batch-sizes 8 --no-decode --cfg-scale 2.0 \
  --dtype float32 bfloat16 int8-fbgemm --llamagen --llamagen-steps 32 --repeats 5 --warmup 0 --threads 2

# 3. The machine's matrix multiply per precision (the ceiling for the linear layers).
section matmul 40 240 bench --matmul --dtype float32 bfloat16 int8 int8-weight int8-fbgemm --threads 2

# 4. A busy machine: a busy loop on one core, started and stopped by the benchmark.
section busy 150 600 bench --busy --models fashion-mnist GPT-B --dtype bfloat16 --repeats 2

# 5. The shipped models at batch 1, 8 and 64, every precision, with LlamaGen's sampler beside the
#    baseline, on the threads the ctfgen command would use (one: they are small).
section shipped 150 480 bench --models fashion-mnist --batch-sizes 1 8 64 \
  --dtype float32 bfloat16 int8 int8-weight int8-fbgemm --llamagen --repeats 5 --warmup 1 --threads auto

# 6. Quality per precision: FD and class consistency of 5000 samples per seed, held-out bits/token.
section quality 300 720 bench --quality --models fashion-mnist fashion-mnist-baseline \
  --dtype float32 bfloat16 int8 int8-fbgemm --seeds 0 1 --per-class 500 --threads 2

# 7. CTF/baseline at GPT-L's shape against the paper's Table 2 (GPT-L stage 1, the 343M aux), batch 1,
#    in bfloat16 (what auto picks on this CPU). GPT-B's ratio comes from section 2.
section gpt_l_batch1 260 600 bench --models GPT-L --batch-sizes 1 --no-decode --cfg-scale 2.0 \
  --dtype bfloat16 --repeats 5 --warmup 0 --threads 2

# 8. torch.compile of the decode step, eager against compiled (the first call compiles).
section compile 100 420 bench --compile --models fashion-mnist --batch-sizes 8 --dtype float32 int8 \
  --repeats 5 --threads 1

echo "done: $(uptime)" | tee -a "$OUT/log.txt"
