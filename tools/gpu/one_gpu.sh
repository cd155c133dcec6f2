#!/usr/bin/env bash
# What one GPU can check of the lessons (torch 2.11 preinstalled there, nothing installed:
# PYTHONPATH=.), in two parts that each fit one device call:
#   cuda: what one GPU is enough for: lesson 11's trainer and engine sharing it (CUDA IPC),
#         started by torchrun and by plain python (ranks forked from a process that imported
#         torch), its benchmark (1B and 8B shapes) and its Triton checksum test, lesson 12's
#         engine on it, and the lessons that take 1 rank on NCCL;
#   gloo: every lesson with 4 ranks, which `auto` puts on gloo (4 local ranks, 1 GPU: NCCL
#         refuses two ranks on one GPU), and every exercise check on the reference solutions
#         (each at both of its world sizes), under the machine's torch.
#
#     bash tools/gpu/one_gpu.sh OUTDIR [cuda|gloo|all]   # logs in OUTDIR/logs, exit codes in
#                                                        # OUTDIR/summary.txt
set -u
export PYTHONPATH=. NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
G=${1:?usage: bash tools/gpu/one_gpu.sh OUTDIR [cuda|gloo|all]}; PART=${2:-all}
mkdir -p "$G/logs" "$G/figs"
TR="python3 -m torch.distributed.run --standalone"
run() { local name=$1 limit=$2; shift 2; local start=$SECONDS
  timeout -k 10 "$limit" "$@" > "$G/logs/$name.log" 2>&1
  echo "$name rc=$? $((SECONDS - start))s" >> "$G/summary.txt"; }

if [ "$PART" != gloo ]; then
  # Two processes on the one GPU (lesson 11's pair; lesson 12's engine on cuda:0, trainer on CPU)
  run cuda2_11_colocate 120 $TR --nproc-per-node 2 lessons/11_colocate.py --out "$G/figs"
  run python2_11_colocate 120 python3 lessons/11_colocate.py --nproc 2 --out "$G/figs"
  run bench_11_colocate 300 python3 benchmarks/colocate.py --out "$G/figs"
  run pytest_11_colocate 180 python3 -m pytest -q -o addopts= -p no:cacheprovider tests/test_11_colocate.py
  run bench_12_live_engine 200 $TR --nproc-per-node 2 benchmarks/live_engine.py --out "$G/figs"
  for l in 00_hello 04_scatter 05_hooks; do  # the lessons that accept a world of 1
    run "nccl1_$l" 120 $TR --nproc-per-node 1 "lessons/$l.py" --backend nccl --out "$G/figs"
  done
  run nccl1_check_00 120 env COURSE_BACKEND=nccl python3 -m lessons.check 00 --solution --nproc 1
  run 00_nccl_forced_4_ranks 60 $TR --nproc-per-node 4 lessons/00_hello.py --backend nccl
fi
if [ "$PART" != cuda ]; then
  for l in 00_hello 01_groups 02_p2p 03_collectives 04_scatter 05_hooks 06_distill \
           07_processes 08_rpc 09_weight_update 10_reshard 11_colocate 12_live_engine 13_experts; do
    run "auto4_$l" 240 $TR --nproc-per-node 4 "lessons/$l.py" --out "$G/figs"
  done
  for n in 00 01 02 03 04 05 06 07 08 09 10 11 12 13; do
    run "check_solution_$n" 240 python3 -m lessons.check $n --solution
  done
fi
cat "$G/summary.txt"
