#!/usr/bin/env bash
# The GPU runs behind the docs' GPU outputs and figures (docs/outputs/gpu/, docs/figures/*_nccl*),
# on a machine with 2 GPUs and torch preinstalled (nothing is installed: PYTHONPATH=.):
#
#     bash tools/gpu/runs.sh OUTDIR        # logs in OUTDIR/logs, figures in OUTDIR/figs
#
# The course ran these on 2 x H200 (torch 2.11, NCCL 2.28.9) in several batches; this script is
# those batches in one. Each run is bounded (timeout) and its exit code goes to OUTDIR/summary.txt.
set -u
export PYTHONPATH=. NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
G=${1:?usage: bash tools/gpu/runs.sh OUTDIR}; mkdir -p "$G/logs" "$G/figs" "$G/gloo"
TR="python3 -m torch.distributed.run --standalone"
run() { local name=$1 limit=$2; shift 2; local start=$SECONDS
  timeout -k 10 "$limit" "$@" > "$G/logs/$name.log" 2>&1
  echo "$name rc=$? $((SECONDS - start))s" >> "$G/summary.txt"; }

L="00_hello 01_groups 02_p2p 03_collectives 04_scatter 05_hooks 06_distill 07_processes 08_rpc 09_weight_update"
for l in $L; do run "nccl2_$l" 150 $TR --nproc-per-node 2 "lessons/$l.py" --out "$G/figs"; done
for l in $L; do run "gloo4_$l" 240 $TR --nproc-per-node 4 "lessons/$l.py" --backend gloo --out "$G/gloo"; done
for n in 00 01 02 03 04 05 06 07 08 09; do run "check_solution_$n" 200 python3 -m lessons.check $n --solution --nproc 2; done
# Lessons 10-13 (written after those runs; not yet run on two GPUs, December 2026): trainer on GPU
# 0, engine on GPU 1, over NCCL; lesson 11's pair shares GPU 0 (CUDA IPC, control over gloo).
# Lesson 12 keeps its tiny engine on CPU (gloo) at any backend; its benchmark below uses NCCL.
for l in 10_reshard 13_experts; do
  run "nccl2_$l" 200 $TR --nproc-per-node 2 "lessons/$l.py" --backend nccl --out "$G/figs"
done
run cuda2_11_colocate 120 $TR --nproc-per-node 2 lessons/11_colocate.py --out "$G/figs"
for l in 10_reshard 11_colocate 12_live_engine 13_experts; do
  run "gloo4_$l" 240 $TR --nproc-per-node 4 "lessons/$l.py" --backend gloo --out "$G/gloo"
done
for n in 10 11 12 13; do run "check_solution_$n" 240 python3 -m lessons.check $n --solution; done
# Failures that must be clear and fast on NCCL too
run 00_nccl_forced_4_ranks 60 $TR --nproc-per-node 4 lessons/00_hello.py --backend nccl
run duplicate_gpu 60 $TR --nproc-per-node 2 tools/gpu/duplicate_gpu.py
run 07_fork_refused 100 $TR --nproc-per-node 2 lessons/07_processes.py --children fork
run 08_teacher_hangs 100 $TR --nproc-per-node 2 lessons/08_rpc.py --teacher hangs --rpc-timeout 3
run 08_teacher_dies 100 $TR --nproc-per-node 2 lessons/08_rpc.py --teacher dies --rpc-timeout 3
# Benchmarks, alone on the GPUs
run bench_03_ring_vs_tree 240 python3 benchmarks/collectives.py --nproc 2 --out "$G/figs"
run bench_06_distill 200 $TR --nproc-per-node 2 -m distill_demo --bench --size large \
    --vocab 131072 --seq 2048 --batch 2 --topk 64 --repeats 20 --out "$G/figs"
for transfer in full topk; do
  run "bench_08_rpc_demo_$transfer" 120 python3 -m rpc_demo --students 1 --teachers 1 --bench \
      --size large --vocab 32768 --seq 1024 --batch 4 --transfer $transfer --topk 64 --rounds 2 \
      --repeats 10 --out "$G/figs/rpc_$transfer"
done
# Training at the large size, student and teacher sharing GPU 0, against one process
for transfer in full topk hidden; do
  run "08_rpc_demo_large_$transfer" 300 python3 -m rpc_demo --students 1 --teachers 1 \
      --backend nccl --size large --vocab 32768 --seq 1024 --batch 4 --steps 24 --topk 64 \
      --transfer $transfer --out "$G/figs/rpc_large_$transfer"
done
# The sizes' learning rates (distill_demo.train.RECIPES; docs/distill_demo.md)
run recipe_probe 500 bash -c 'P=tools/gpu/recipe_probe.py; A="large 32768 1024 4"
  python3 $P teacher $A 60 1e-2,1e-3,3e-4,1e-4 0; python3 $P teacher $A 200 1e-3,3e-4 10
  python3 $P student $A 60 1e-2,3e-3,1e-3,3e-4 full; python3 $P student $A 60 1e-2,1e-3,3e-4 topk
  python3 $P student $A 60 1e-2,1e-3,3e-4 hidden'
# Why the teacher's forward is slower in RPC threads (docs/rpc_demo.md): three ways to serve
run rpc_probe 500 python3 tools/gpu/rpc_probe.py
run bench_09_weight_update 400 $TR --nproc-per-node 2 benchmarks/weight_update.py --backend nccl \
    --out "$G/figs"
run trace_gpu 200 python3 tools/capture_debug_outputs.py gpu "$G/trace"
run bench_11_colocate 400 python3 benchmarks/colocate.py --out "$G/figs"
run bench_12_live_engine_nccl 300 $TR --nproc-per-node 2 benchmarks/live_engine.py \
    --backend nccl --out "$G/figs"
cat "$G/summary.txt"
