"""Why was rpc_demo's teacher forward slower in an RPC thread than in a main thread on GPUs, and
are its answers intact? A diagnostic behind docs/rpc_demo.md, not part of the course; its
findings are why rpc_demo's teacher now answers from its main thread.

    PYTHONPATH=. NCCL_NVLS_ENABLE=0 python3 tools/gpu/rpc_probe.py [--part abc] [--mode both]

rpc_demo's teacher (the "large" model in bf16, vocab 32768, seq 1024, batch 4; what the GPU
benchmark ran) is timed the ways it can run, each forward between two torch.cuda.synchronize().

A  one process: the main thread; the main thread on the next of 32 pool streams each call
   (what the RPC agent does: every message gets streams from torch's pool); a Python thread;
   deterministic algorithms off and on.
B  two forked processes, a student on GPU 0 and a teacher on GPU 1 (both on GPU 0 with one
   GPU), RPC with device_maps as in rpc_demo, two requests in flight as in its pipelined step:
     rpc-thread   rpc_demo's first way: the forward in the RPC thread, on RPC's stream
     own-stream   the same thread, the forward on one stream the teacher keeps
     main-thread  rpc_demo's way now (@rpc.functions.async_execution): the RPC thread queues
                  the request; the teacher's main thread runs it and completes the Future
   and, for each: forward ms, round trip, cudaMalloc calls (new segments) per request, how many
   pool streams and threads served the calls, and whether every answer equals the same forward
   run by the student on its own copy of the teacher (bitwise on identical GPUs).
C  is one GPU's training reproducible? rpc_demo's single-process reference, twice, same seeds.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import threading
import time

import torch
import torch.distributed.rpc as rpc
import torch.multiprocessing as mp

from distill_demo.knowledge import teacher_message
from distill_demo.models import make_teacher

VOCAB, SEQ, BATCH, TOPK, SIZE = 32768, 1024, 4, 64, "large"
WARMUP, REPEATS = 3, 12  # part A
CALLS = 48  # part B, per variant: past the 32 streams of torch's pool, to see a steady state
BATCHES = 4  # distinct id batches, reused as rpc_demo's benchmark does
PORT = 29611

MODEL, DEVICE, OWN_STREAM = None, None, None  # the teacher process's
JOBS = queue.Queue()  # (job, deliver): work for the teacher's main thread


def build(device):
    return make_teacher(SIZE, VOCAB, SEQ).to(device, torch.bfloat16).eval()


def segments(device) -> int:
    """cudaMalloc calls the caching allocator has made on `device` so far."""
    return torch.cuda.memory_stats(device).get("segment.all.allocated", 0)


def timed(fn, repeats=REPEATS, warmup=WARMUP):
    """Median and max ms of fn(i), each call between two synchronize()s."""
    times = []
    for i in range(warmup + repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn(i)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), max(times)


def in_thread(fn):
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("r", fn()))
    worker.start()
    worker.join()
    return out["r"]


def part_a(device, modes):
    torch.cuda.set_device(device)
    print(f"A on {torch.cuda.get_device_name(device)}", flush=True)
    model = build(device)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), device=device)
    pool = [torch.cuda.Stream(device) for _ in range(32)]  # torch.cuda.Stream(): from the pool

    def on_pool(mode):
        def call(i):
            stream = pool[i % len(pool)]
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                teacher_message(mode, model, ids, TOPK)

        return call

    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        for mode in modes:

            def plain(i, mode=mode):
                teacher_message(mode, model, ids, TOPK)

            def on_thread(mode=mode):
                torch.cuda.set_device(device)  # the current device is a thread's own
                return timed(plain)

            def on_thread_pool(mode=mode):
                torch.cuda.set_device(device)
                return timed(on_pool(mode))

            before = segments(device)
            rows = {
                "main thread": timed(plain),
                "main thread, next pool stream each call": timed(on_pool(mode)),
                "python thread": in_thread(on_thread),
                "python thread, next pool stream each call": in_thread(on_thread_pool),
            }
            for what, (median, worst) in rows.items():
                print(
                    f"A det={deterministic!s:5} {mode:4} {what:42} median {median:7.2f} ms"
                    f"  max {worst:7.2f} ms",
                    flush=True,
                )
            print(
                f"A det={deterministic!s:5} {mode:4} cudaMalloc calls over these "
                f"{4 * (WARMUP + REPEATS)} forwards: {segments(device) - before}",
                flush=True,
            )
    torch.use_deterministic_algorithms(False)


# ---- part B: the teacher's three ways to answer --------------------------------------------


def forward(mode, ids):
    """The teacher's forward, timed; returns (ms, stream id, thread id, new segments, message)."""
    before = segments(DEVICE)
    torch.cuda.synchronize()
    start = time.perf_counter()
    message = teacher_message(mode, MODEL, ids, TOPK)
    torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - start)
    return (
        ms,
        torch.cuda.current_stream().stream_id,
        threading.get_ident(),
        segments(DEVICE) - before,
        message,
    )


def rpc_thread(mode, ids):
    """rpc_demo's first way: in the RPC thread, on the stream RPC made current for this message."""
    with torch.cuda.device(DEVICE):  # an RPC thread's current device is GPU 0
        return forward(mode, ids)


def own_stream(mode, ids):
    """The same thread, but the forward on one stream the teacher keeps for all requests."""
    with torch.cuda.device(DEVICE):
        rpc_stream = torch.cuda.current_stream()
        OWN_STREAM.wait_stream(rpc_stream)  # ids arrived on RPC's stream
        with torch.cuda.stream(OWN_STREAM):
            ids.record_stream(OWN_STREAM)
            out = forward(mode, ids)
        rpc_stream.wait_stream(OWN_STREAM)  # RPC sends once its stream has caught up
        for tensor in out[-1]:
            tensor.record_stream(rpc_stream)  # not reused before RPC is done with it
        return out


@rpc.functions.async_execution
def main_thread(mode, ids):
    """The RPC thread only queues the request; the teacher's main thread answers it. The
    Future's devices make RPC wait for the stream that was current when it was completed."""
    future = torch.futures.Future(devices=[DEVICE])
    with torch.cuda.device(DEVICE):
        arrived = torch.cuda.Event()
        arrived.record()  # on RPC's stream, where ids arrived

    def job():
        torch.cuda.current_stream(DEVICE).wait_event(arrived)
        ids.record_stream(torch.cuda.current_stream(DEVICE))
        return forward(mode, ids)

    JOBS.put((job, future.set_result))
    return future


VARIANTS = {"rpc-thread": rpc_thread, "own-stream": own_stream, "main-thread": main_thread}


def student(modes, deterministic):
    copy = build(DEVICE)  # the teacher's model, seeded alike: what every answer must equal
    batches = [torch.randint(0, VOCAB, (BATCH, SEQ), device=DEVICE) for _ in range(BATCHES)]
    for mode in modes:
        expected = [teacher_message(mode, copy, ids, TOPK) for ids in batches]
        for name, fn in VARIANTS.items():
            rows, trips, worst = [], [], 0.0

            def ask(i, fn=fn, mode=mode):  # a call now: when, which batch, the future
                return (
                    time.perf_counter(),
                    i,
                    rpc.rpc_async("teacher", fn, args=(mode, batches[i % BATCHES])),
                )

            pending = [ask(0), ask(1)]  # two in flight, as rpc_demo's pipelined step has
            for i in range(CALLS):
                asked, index, future = pending.pop(0)
                ms, stream, thread, new, message = future.wait()
                torch.cuda.synchronize()
                trips.append(1e3 * (time.perf_counter() - asked))
                if i + 2 < CALLS:
                    pending.append(ask(i + 2))
                rows.append((ms, stream, thread, new))
                for got, want in zip(message, expected[index % BATCHES]):
                    worst = max(worst, (got.float() - want.float()).abs().max().item())
            first, last = rows[:16], rows[-16:]
            med = lambda part, k: statistics.median(r[k] for r in part)  # noqa: E731
            print(
                f"B det={deterministic!s:5} {mode:4} {name:11} forward ms: calls 1-16 "
                f"{med(first, 0):7.2f}, {CALLS - 15}-{CALLS} {med(last, 0):7.2f}; round trip "
                f"{statistics.median(trips[-16:]):7.2f}; cudaMalloc/call {med(first, 3):g} "
                f"then {med(last, 3):g}; {len({r[1] for r in rows})} streams, "
                f"{len({r[2] for r in rows})} threads; answers vs the student's own forward: "
                f"largest difference {worst:.1e}",
                flush=True,
            )
        main_ms = rpc.rpc_sync("teacher", teacher_main, args=(mode,))
        print(
            f"B det={deterministic!s:5} {mode:4} teacher's main thread, called directly: "
            f"median {main_ms[0]:7.2f} ms, max {main_ms[1]:7.2f} ms",
            flush=True,
        )
    profile = rpc.rpc_sync("teacher", profiled, args=(modes[-1], batches[0]))
    print(
        f"B det={deterministic!s:5} one rpc-thread forward under torch.profiler "
        f"({modes[-1]}):\n{profile}",
        flush=True,
    )


def teacher_main(mode):
    """Ask the teacher's main thread to time its forward on its own (no RPC in the way)."""

    def job():
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), device=DEVICE)
        return timed(lambda i: teacher_message(mode, MODEL, ids, TOPK))

    box, done = {}, threading.Event()
    JOBS.put((job, lambda r: (box.setdefault("r", r), done.set())))
    done.wait()
    return box["r"]


def profiled(mode, ids):
    from torch.profiler import ProfilerActivity, profile

    with (
        torch.cuda.device(DEVICE),
        profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof,
    ):
        teacher_message(mode, MODEL, ids, TOPK)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=16)


def process(rank, student_gpu, teacher_gpu, modes, deterministic):
    """A forked child: rank 0 the student, rank 1 the teacher."""
    global MODEL, DEVICE, OWN_STREAM
    os.environ["TP_SOCKET_IFNAME"] = os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    if deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True, warn_only=True)
    DEVICE = torch.device("cuda", teacher_gpu if rank else student_gpu)
    torch.cuda.set_device(DEVICE)
    maps = None if rank else {"teacher": {DEVICE: torch.device("cuda", teacher_gpu)}}
    options = rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://127.0.0.1:{PORT + deterministic}", rpc_timeout=120, device_maps=maps
    )
    if rank:
        MODEL, OWN_STREAM = build(DEVICE), torch.cuda.Stream(DEVICE)

    def join_and_work():
        rpc.init_rpc(
            ["student", "teacher"][rank], rank=rank, world_size=2, rpc_backend_options=options
        )
        if rank == 0:
            student(modes, deterministic)
        rpc.shutdown()

    if rank == 0:
        join_and_work()
        return
    # The teacher: RPC in a thread, so that this, the main thread, can answer queued requests.
    runner = threading.Thread(target=join_and_work, daemon=True)
    runner.start()
    while runner.is_alive():
        try:
            job, deliver = JOBS.get(timeout=0.1)
        except queue.Empty:
            continue
        with torch.cuda.device(DEVICE):
            deliver(job())


def part_c(device, modes, steps=16):
    from distill_demo.reference import train_reference
    from distill_demo.train import Config

    torch.cuda.set_device(device)
    torch.use_deterministic_algorithms(True, warn_only=True)
    for mode in modes:
        # lr 1e-2, no teacher pretraining; Config.autocast() is bf16 on the GPU, as before
        cfg = Config(SIZE, VOCAB, SEQ, BATCH, 1e-2, TOPK, 0, torch.device(device))
        runs = [train_reference(cfg, mode, 1, steps)[0] for _ in range(2)]
        worst = max(abs(a - b) / abs(b) for a, b in zip(*runs))
        print(
            f"C {mode:4} the same training twice on one GPU: largest relative loss difference "
            f"{worst:.1e}; losses {runs[0][0]:.4f} -> {runs[0][-1]:.4f}",
            flush=True,
        )
    torch.use_deterministic_algorithms(False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="abc", help="any of a, b, c (abc)")
    parser.add_argument("--mode", choices=("topk", "full", "both"), default="both")
    args = parser.parse_args()
    modes = ["topk", "full"] if args.mode == "both" else [args.mode]
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # count GPUs without initialising CUDA
    gpus = torch.cuda.device_count()
    print(f"torch {torch.__version__}, {gpus} GPUs", flush=True)
    if "b" in args.part:  # first: the children are forked, so CUDA must not be initialised yet
        for deterministic in (False, True):
            context = mp.start_processes(
                process,
                args=(0, min(1, gpus - 1), modes, deterministic),
                nprocs=2,
                start_method="fork",
                join=False,
            )
            try:  # a failure here must not cost parts A and C
                while not context.join(timeout=600):
                    pass
            except Exception as err:  # noqa: BLE001 (what failed is printed; A and C go on)
                print(f"B det={deterministic} failed: {err}", flush=True)
                for child in context.processes:
                    child.kill()
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # before the first matmul here
    if "a" in args.part:
        part_a(torch.device("cuda", 0), modes)
    if "c" in args.part:
        part_c(torch.device("cuda", 0), modes)


if __name__ == "__main__":
    main()
