"""rpc_demo - distillation over RPC: students in a data-parallel world of their own, teachers in a
world of theirs, and the students calling the teachers with TorchRPC (lesson 08), the next
request in flight while they compute. The models, data, losses and step are distill_demo's, so
the results are comparable: --bench trains the same config over p2p (distill_demo) and over RPC
in one run and prints both.

Run it (from the repository root; it starts its own processes: python, not torchrun)
    python -m rpc_demo                                   # 2 students, 2 teachers
    python -m rpc_demo --students 3 --teachers 1 --transfer topk
    python -m rpc_demo --students 1 --teachers 1 --bench # p2p vs RPC: step time, tokens/s
    python -m rpc_demo --fault dies                      # the last teacher dies at step 3
    On GPUs (one per process, NCCL in each world, CUDA tensors straight through RPC):
    python -m rpc_demo --students 1 --teachers 1 --bench --size large --vocab 32768 --seq 1024

What you should see
    rank 0 (student0) prints the mapping of teachers to students, the worlds and their ports,
    a progress line every tenth of the run, the bytes each step moved, and "checked: ..." lines
    (students agree; each teacher answered every step; losses and weights match one process).
    --bench prints a table (p2p and RPC: step ms, tokens/s, RPC/p2p against the 1.2x goal),
    checks that both paths gave the same losses, and says where the time goes.
    Figures go to --out (out/): 08_demo_loss.png, 08_demo_timeline.png; with --bench,
    08_demo_bench.png and 08_demo_bench_timeline.png.
Modules: launch.py (starting and watching the processes), worker.py (one process's life),
worlds.py (joining the worlds, bounded), roles.py, student.py, teacher.py, bench.py.
docs/rpc_demo.md explains the design.
"""

from __future__ import annotations

import argparse
import os

from distill_demo.comms import Layout
from distill_demo.train import add_training_flags, training_defaults, training_flag_errors
from rpc_demo.launch import launch, refuse
from rpc_demo.teacher import FAULT_STEP


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m rpc_demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--students", type=int, default=2, help="student processes (2)")
    p.add_argument("--teachers", type=int, default=2, help="teacher processes (2)")
    add_training_flags(p, "the first teacher")
    p.add_argument(
        "--bench", action="store_true", help="train the same config over p2p and over RPC; compare"
    )
    p.add_argument("--warmup", type=int, default=3, help="--bench: untimed steps first (3)")
    p.add_argument(
        "--repeats", type=int, default=20, help="--bench: timed steps per round and path (20)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="--bench: p2p then RPC, this many times, so both see the same load (3)",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "gloo", "nccl"],
        default=env("COURSE_BACKEND", "auto"),
        help="auto: NCCL if every process gets a GPU, else gloo on CPU; nccl with "
        "fewer GPUs: students and teachers share them (not with --bench)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=float(env("COURSE_TIMEOUT", "60")),
        help="seconds a collective in a role's world may wait (60)",
    )
    p.add_argument(
        "--rpc-timeout",
        type=float,
        default=30.0,
        help="seconds to join RPC, and for each call; a teacher that does not answer "
        "in time is named by its students (30)",
    )
    p.add_argument(
        "--rpc-transport",
        choices=["auto", "shm", "uv"],
        default="auto",
        help="how TensorPipe moves bytes: shared memory (its poller spins: up to a "
        "core per process) or TCP on loopback; auto: uv on CPU, shm on GPUs",
    )
    for flag, world in (
        ("student", "the students' world"),
        ("teacher", "the teachers' world"),
        ("rpc", "the RPC world's rendezvous"),
    ):
        p.add_argument(
            f"--{flag}-port", type=int, default=0, help=f"{world}'s port (0: a free one)"
        )
    p.add_argument(
        "--start",
        choices=["fork", "spawn"],
        default="fork",
        help="how the launcher starts processes: fork (fast; the default) or spawn",
    )
    p.add_argument(
        "--fault",
        choices=["none", "absent", "dies", "hangs"],
        default="none",
        help=f"make the last teacher misbehave (absent: never joins RPC; dies, hangs: "
        f"at request {FAULT_STEP}) to see the students fail fast, naming it",
    )
    p.add_argument("--out", default="out", help="folder for the figures (out/)")
    p.add_argument("--save", help="write the trained student's weights to this file")
    return training_defaults(p.parse_args(argv))


def validate(args: argparse.Namespace) -> None:
    """Every mistake in the flags, said before any process starts."""
    if args.students < 1 or args.teachers < 1:
        refuse(f"--students {args.students} --teachers {args.teachers}: at least 1 of each")
    layout = Layout(args.students + args.teachers, args.teachers, args.students)
    per_student = len(layout.units[0].teachers)
    for bad, message in training_flag_errors(args, per_student) + [
        (
            min(args.steps, args.repeats, args.rounds) < 1
            or min(args.warmup, args.teacher_steps) < 0,
            "--steps, --repeats and --rounds must be at least 1, --warmup and --teacher-steps at "
            "least 0",
        ),
        (args.rpc_timeout <= 0 or args.timeout <= 0, "--timeout and --rpc-timeout must be > 0"),
        (
            not all(0 <= p < 65536 for p in (args.student_port, args.teacher_port, args.rpc_port)),
            "ports are numbers from 0 (a free one) to 65535",
        ),
        (
            args.bench and args.fault != "none",
            f"--fault {args.fault} is for training runs: leave out --bench",
        ),
        (
            args.fault in ("dies", "hangs") and args.steps < FAULT_STEP,
            f"--fault {args.fault} strikes at step {FAULT_STEP}: train for at least that many",
        ),
    ]:
        if bad:
            refuse(message)


def main(argv: list[str] | None = None) -> None:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: every rank says it, then exits
        from course.ranks import usage_error

        usage_error(
            "rpc_demo starts its own processes (two worlds, and RPC between them): run "
            "python -m rpc_demo [--students S --teachers T], not under torchrun"
        )
    args = parse_args(argv)
    validate(args)
    raise SystemExit(launch(args))


if __name__ == "__main__":
    main()
