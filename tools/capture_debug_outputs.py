"""Regenerate the real outputs and pictures that the docs show (debugging, tracing, other pages).

    python tools/capture_debug_outputs.py                 # all but gpu: ~35 min
    python tools/capture_debug_outputs.py broken          # docs/outputs/broken_*.txt only
    python tools/capture_debug_outputs.py traces          # docs/figures/trace_*.png only
    python tools/capture_debug_outputs.py overhead        # docs/outputs/trace_overhead.txt
    python tools/capture_debug_outputs.py troubles        # docs/outputs/trouble_*.txt only
    python tools/capture_debug_outputs.py raw             # one run under torchrun, every line
    python tools/capture_debug_outputs.py pages [NAME..]  # docs/outputs/page_*.txt: ~5 min
    python tools/capture_debug_outputs.py gpu OUT         # NCCL traces on 2 GPUs, into OUT

broken: every command under "Run it" in every lessons/broken/ program (a hang under default
flags takes the 60 s timeout), plus lesson 06 on 3 ranks
and the send/send deadlock with a long timeout (stopped by the launcher), on gloo. Each output
goes to docs/outputs/broken_<name>[_<n>].txt as course.launcher prints it: the run_lesson call
that made it, then the ranks' lines in rank order and the launcher's summary, paths relative.
raw: one of them under the real torchrun command in a terminal's environment, every line kept.
traces: lessons 02, 05, 06 and 09, and the reference solutions of exercises 02.2, 05.1 and
09.1 (through `COURSE_TRACE=DIR python -m lessons.check ID --solution`), with --trace on 2 or 4
gloo ranks; each timeline redrawn (course.trace.merge) zoomed on the part the docs talk about.
overhead: benchmarks/trace_overhead.py's output.
pages: every other output a page shows (PAGES: lessons' --broken demos, checks of wrong answers,
distill_demo and rpc_demo runs, benchmarks, bad flags, faults), each from the command the page
names, on gloo, into docs/outputs/page_<name>.txt: the command, then its lines (ranks in order).
troubles: for docs/troubleshooting.md, lesson 00 told to meet on a port that is already taken,
told to use NCCL on a machine without enough GPUs, and given bad values (--timeout 0,
COURSE_TIMEOUT=abc, COURSE_BACKEND=cuda, COURSE_DEBUG=yes).
live: for docs/instructors.md, a notebook cell on live ranks (course/live.py) that hangs.
gpu: lessons 00 (if it takes --trace), 02, 06 and 09 with --trace on 2 ranks, NCCL (or
COURSE_BACKEND), each bounded by 30 s; into OUT, at most 7 files: nccl_<lesson>.png for each,
nccl_02_trace.json, gpu_summary.txt (versions, exits, the event formats seen) and
gpu_traces.tar.gz (everything, the per-rank traces too if it stays under 15 MiB).
"""

import collections
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from course import launcher, trace
from lessons.broken import documented_runs

ROOT = launcher.ROOT

OUTPUTS, FIGURES = ROOT / "docs" / "outputs", ROOT / "docs" / "figures"
GLOO = {"COURSE_BACKEND": "gloo"}
SITE = re.compile(r"[^\s\"]*/site-packages/")  # torch's own files: shown as site-packages/...
TIME = re.compile(r"\d\d:\d\d:\d\d(\.\d+)?")  # torch's log stamps: the same on every run


def tidy(lines):
    """Paths relative to the checkout, torch's as site-packages/...: the same on every machine."""
    return [SITE.sub("site-packages/", line.replace(f"{ROOT}/", "")) for line in lines]


def save(name, command, result):
    text = "\n".join([f"$ {command}", *tidy(result.lines + result.stuck)]) + "\n"
    (OUTPUTS / f"{name}.txt").write_text(text)
    print(f"docs/outputs/{name}.txt: exit {result.returncode}, {result.seconds:.0f} s", flush=True)


def run_lesson_command(path, nproc, args=(), timeout=None):
    """What produced an output, as a learner would type it: run_lesson, in a notebook or a shell
    (torchrun in a terminal prints the same lines, interleaved, plus its own: see capture_raw)."""
    call = [repr(str(path.relative_to(ROOT))), str(nproc)]
    call += [repr(list(args))] if args else []
    call += [f"timeout={timeout}"] if timeout else []
    return f'python -c "from course.launcher import run_lesson; run_lesson({", ".join(call)})"'


def capture_broken():
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    for path in sorted((ROOT / "lessons" / "broken").glob("[a-z]*.py")):
        for i, (nproc, args) in enumerate(documented_runs(path), 1):
            name = f"broken_{path.stem}" + (f"_{i}" if i > 1 else "")
            command = run_lesson_command(path, nproc, args)
            save(name, command, launcher.launch(path, nproc, args, timeout=180, env=GLOO))
    deadlock = ROOT / "lessons" / "broken" / "send_send_deadlock.py"
    save(
        "broken_send_send_deadlock_stopped",
        run_lesson_command(deadlock, 2, ["--timeout", "600"], timeout=20),
        launcher.launch(deadlock, 2, ["--timeout", "600"], timeout=20, env=GLOO),
    )
    distill = ROOT / "lessons" / "06_distill.py"
    save(
        "broken_odd_world_size",
        run_lesson_command(distill, 3),
        launcher.launch(distill, 3, timeout=120, env=GLOO),
    )


def capture_raw():
    """One broken program as a terminal shows it under the real torchrun command, every line
    kept: what docs/debugging.md's "Under torchrun, in a terminal" annotates."""
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    command = "torchrun --nproc-per-node 2 lessons/broken/collective_mismatch.py --debug"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # a learner's shell
    done = subprocess.run(
        command.split(),
        cwd=ROOT,
        env={**env, **GLOO},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    lines = [TIME.sub("HH:MM:SS", line) for line in tidy(done.stdout.splitlines())]
    (OUTPUTS / "raw_torchrun_collective_mismatch.txt").write_text(
        "\n".join([f"$ {command}", *lines]) + "\n"
    )
    print(f"docs/outputs/raw_torchrun_collective_mismatch.txt: exit {done.returncode}")


def capture_troubles():
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    hello = ROOT / "lessons" / "00_hello.py"
    with socket.socket() as taken:  # something else listens on this port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = ["--init-method", f"tcp://127.0.0.1:{taken.getsockname()[1]}"]
        save(
            "trouble_port_in_use",
            run_lesson_command(hello, 2, args),
            launcher.launch(hello, 2, args, timeout=60, env=GLOO),
        )
    save(
        "trouble_nccl_without_gpus",
        run_lesson_command(hello, 2, ["--backend", "nccl"]),
        launcher.launch(hello, 2, ["--backend", "nccl"], timeout=60),
    )
    bad = [  # a bad value on the command line or in a COURSE_ variable: one line on every rank
        (["--timeout", "0"], {}),
        ([], {"COURSE_TIMEOUT": "abc"}),
        ([], {"COURSE_BACKEND": "cuda"}),
        ([], {"COURSE_DEBUG": "yes"}),
    ]
    text = []
    for args, env in bad:
        done = launcher.launch(hello, 2, args, timeout=60, env={**GLOO, **env})
        command = run_lesson_command(hello, 2, args)
        if env:
            command = command.replace(')"', f', env={env!r})"')
        text += [f"$ {command}", *tidy(done.lines + done.stuck), ""]
    (OUTPUTS / "trouble_bad_values.txt").write_text("\n".join(text))
    print("docs/outputs/trouble_bad_values.txt", flush=True)


PYTHON = "python"  # how a command reads in docs/outputs: as a learner types it
DEMO = ["--out", "out/pages"]  # the demos' figures: not the ones in docs/figures


def dying_teacher(test_file, rank, step, folder):
    """The wrapper that a test (tests/<test_file>.py) uses to make teacher `rank` exit with code 0
    at its `step`-th answer: the pages show what the others then say."""
    sys.path.insert(0, str(ROOT / "tests"))
    test = __import__(test_file)
    return test.dying_teacher(Path(folder), rank, step, "os._exit(0)")


# name: (what to run, ranks, arguments, timeout s). What: a lesson's number; "check"; a `python -m`
# module (it starts its own processes); "-c" (python -c); or (a test's file, teacher rank, step).
PAGES = {
    "01_broken_order": ("01", 4, ["--broken", "order"], 120),
    "01_check_wrong": ("check", 0, ["01", "--file", "tests/wrong/01_groups.py"], 180),
    "02_broken_deadlock": ("02", 2, ["--broken", "deadlock"], 120),
    "02_check_wrong_1": ("check", 0, ["02.1", "--file", "tests/wrong/02_p2p.py"], 180),
    "02_check_wrong_2": ("check", 0, ["02.2", "--file", "tests/wrong/02_p2p.py"], 180),
    "06_teacher_exits": (("test_06_distill", 3, 5), 4, [], 120),
    "distill_demo": ("distill_demo", 0, ["--nproc", "4", *DEMO], 300),
    "distill_demo_bench": ("distill_demo", 0, ["--nproc", "2", "--bench", *DEMO], 300),
    "distill_demo_bad_ratio": ("distill_demo", 0, ["--nproc", "4", "--ratio", "1:2"], 60),
    "distill_demo_bad_topk": (
        "distill_demo",
        0,
        ["--nproc", "2", "--transfer", "topk", "--topk", "300"],
        60,
    ),
    "distill_demo_bad_batch": (
        "distill_demo",
        0,
        ["--nproc", "4", "--ratio", "3:1", "--batch", "2"],
        60,
    ),
    "distill_demo_teacher_exits": (
        ("test_distill_demo", 3, 5),
        4,
        ["--ratio", "1:3", "--steps", "50", "--teacher-steps", "0", *DEMO],
        120,
    ),
    "rpc_demo": ("rpc_demo", 0, DEMO, 300),
    "rpc_demo_bench": (
        "rpc_demo",
        0,
        ["--students", "1", "--teachers", "1", "--bench", *DEMO],
        400,
    ),
    "rpc_demo_bench_shm": (
        "rpc_demo",
        0,
        ["--students", "1", "--teachers", "1", "--bench", "--rpc-transport", "shm", *DEMO],
        400,
    ),
    "rpc_demo_bad_port": ("rpc_demo", 0, ["--rpc-port", "TAKEN"], 60),
    "rpc_demo_same_ports": ("rpc_demo", 0, ["--student-port", "5000", "--rpc-port", "5000"], 60),
    "rpc_demo_bad_batch": (
        "rpc_demo",
        0,
        ["--students", "1", "--teachers", "3", "--batch", "2"],
        60,
    ),
    "rpc_demo_fork_refused": (  # CUDA needs a GPU; a process group joined first does it on CPU
        "-c",
        0,
        [
            "import torch.distributed as dist; from rpc_demo.__main__ import main; "
            'dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1); '
            'main(["--start", "fork"])'
        ],
        60,
    ),
    "rpc_demo_dies": (
        "rpc_demo",
        0,
        ["--fault", "dies", "--rpc-timeout", "5", "--teacher-steps", "0"],
        120,
    ),
    "rpc_demo_hangs": (
        "rpc_demo",
        0,
        ["--fault", "hangs", "--rpc-timeout", "5", "--teacher-steps", "0"],
        120,
    ),
    "rpc_demo_absent": (
        "rpc_demo",
        0,
        ["--fault", "absent", "--rpc-timeout", "5", "--teacher-steps", "0"],
        120,
    ),
    "rpc_demo_slow_teacher": (
        "rpc_demo",
        0,
        [
            "--students",
            "1",
            "--teachers",
            "1",
            "--teacher-steps",
            "1200",
            "--rpc-timeout",
            "3",
            *DEMO,
        ],
        400,
    ),
}


def capture_pages(only=None):
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    for name, (what, nproc, args, timeout) in PAGES.items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory() as folder, socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))  # something else listens on this port
            taken.listen()
            args = [str(taken.getsockname()[1]) if a == "TAKEN" else a for a in args]
            if isinstance(what, tuple):  # the program, wrapped by a test to lose a teacher
                test_file, rank, step = what
                program = "distill_demo" if "demo" in test_file else "lessons/06_distill.py"
                path = dying_teacher(test_file, rank, step, folder)
                env = {**GLOO, "COURSE_TIMEOUT": "30"}
                # The course's launcher ran it (its "launcher: rank N failed first" line is in
                # the page), on a copy of the program a test wrote: say both.
                call = [repr(path.name), str(nproc), *([repr(list(args))] if args else [])]
                call.append(f"env={env!r}")
                command = (
                    'python -c "from course.launcher import run_lesson; '
                    f'run_lesson({", ".join(call)})"  # {path.name}: {program} with teacher rank '
                    f"{rank} made to exit (code 0) at its answer {step}, written by "
                    f"tests/{test_file}.py's dying_teacher"
                )
                result = launcher.launch(path, nproc, args, timeout, env=env)
            elif what.isdigit():
                path = launcher.lesson_path(what)
                command = run_lesson_command(path, nproc, args)
                result = launcher.launch(path, nproc, args, timeout, env=GLOO)
            else:
                head = {"check": ["-m", "lessons.check"], "-c": ["-c"]}.get(what, ["-m", what])
                command = shlex.join([PYTHON, *head, *args])
                cmd = [sys.executable, *head, *args]
                result = launcher.run_command(cmd, timeout, env=GLOO, cwd=ROOT)
        save(f"page_{name}", command, result)


def span_of(op, pad=1.0):
    """A window (ms) from the first `op` on any rank to the end of the last one."""

    def pick(digests):
        mine = [o["t"] for d in digests for o in d["ops"] if o["op"] == op]
        return min(s for s, _ in mine) - pad, max(e for _, e in mine) + pad

    return pick


def first_to_last(op, first, last, rank=0, pad=0.5):
    """A window (ms) from the start of rank's `first` op of a kind to the end of its `last`."""

    def pick(digests):
        mine = sorted((o for o in digests[rank]["ops"] if o["op"] == op), key=lambda o: o["t"][0])
        first_one, last_one = mine[max(first, -len(mine))], mine[min(last, len(mine) - 1)]
        return first_one["t"][0] - pad, last_one["t"][1] + pad

    return pick


# name: (what to run: a lesson, or "check ID"; ranks; window picker or None; the title).
# Overlap pictures use 2 ranks: on 2 shared cores, 4 ranks mostly show the OS's scheduling.
TRACES = {
    "02_p2p": (
        "02",
        4,
        None,
        "lesson 02 on 4 gloo ranks: send/recv in pairs, the shape "
        "handshake (header, then payload), isend/irecv, a ring of batch_isend_irecv",
    ),
    "02_ring_all_reduce": (
        "check 02.2",
        4,
        span_of("send"),
        "exercise 02.2, the reference ring all-reduce on 4 gloo ranks: "
        "2 x 3 steps of isend/irecv round the ring",
    ),
    "05_overlap": (
        "05",
        2,
        first_to_last("all_reduce", -24, -1, pad=1.0),
        "lesson 05 on 2 gloo ranks: an all_reduce per parameter, started from its "
        "hook while backward goes on (3 steps, 8 parameters)",
    ),
    "05_buckets": (
        "check 05.1",
        2,
        span_of("all_reduce", pad=1.0),
        "exercise 05.1, the reference bucketed DDP on 2 gloo ranks: fewer, bigger "
        "all_reduces, still overlapping backward",
    ),
    "06_distill": (
        "06",
        4,
        first_to_last("send", 4, 11, pad=1.0),
        "lesson 06 on 4 gloo ranks (students 0, 1; teachers 2, 3): 4 steps of ids "
        "out, probabilities back, the students' all_reduce",
    ),
    "09_naive": (
        "09",
        4,
        None,
        "lesson 09 on 4 gloo ranks: the naive update (a request and a "
        "broadcast per tensor), then a timed 16 MiB broadcast",
    ),
    "09_fast": (
        "check 09.1",
        4,
        None,
        "exercise 09.1, the reference fast update on 4 gloo "
        "ranks: metadata once, then flat buckets back to back",
    ),
}


def capture_traces(only=None):
    FIGURES.mkdir(parents=True, exist_ok=True)
    for name, (what, nproc, window, title) in TRACES.items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory() as folder:
            if what.startswith("check "):  # the check's ranks read --trace from COURSE_TRACE
                result = launcher.run_command(
                    [
                        sys.executable,
                        "-m",
                        "lessons.check",
                        what.split()[1],
                        "--solution",
                        "--nproc",
                        str(nproc),
                    ],
                    timeout=300,
                    env={**GLOO, "COURSE_TRACE": folder},
                )
            else:
                result = launcher.launch(
                    launcher.lesson_path(what), nproc, ["--trace", folder], timeout=300, env=GLOO
                )
            digests_file = Path(folder) / "digests.json"
            if result.returncode != 0 or not digests_file.is_file():
                sys.exit(f"{name}: {what} failed or wrote no trace:\n" + "\n".join(result.lines))
            digests = json.loads(digests_file.read_text())
            zoom = window(trace.align(digests)) if window else None
            png = FIGURES / f"trace_{name}.png"
            print(trace.merge(digests, folder, zoom, png, title), flush=True)


def capture_overhead():
    """Every run inside the benchmark is bounded by course.launcher, so no timeout here."""
    done = subprocess.run(
        [sys.executable, "benchmarks/trace_overhead.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    text = "$ python benchmarks/trace_overhead.py\n" + done.stdout
    (OUTPUTS / "trace_overhead.txt").write_text(text)
    print(done.stdout)


GPU_LESSONS = ["00", "02", "06", "09"]  # 00 only once it takes --trace (see docs/tracing.md)


def event_formats(rank_file):
    """What the profiler wrote, for checking the parser against a new torch: event counts by
    category and name, and one example of each kind of communication event's arguments."""
    events = json.loads(rank_file.read_text())["traceEvents"]
    kinds = collections.Counter(
        (e.get("cat"), re.split(r"[(_:]", e["name"])[0]) for e in events if e.get("ph") == "X"
    )
    lines = [f"  {n:6d} {cat} {name}" for (cat, name), n in kinds.most_common(25)]
    for probe in ("nccl", "record_param_comms", "gloo:", "c10d::"):
        found = next((e for e in events if probe in e["name"].lower() and e.get("args")), None)
        if found:
            lines.append(
                f"  example {found.get('cat')} {found['name'][:60]}: "
                f"{json.dumps(found['args'])[:600]}"
            )
    return lines


def capture_gpu(out):
    """The NCCL run for the lead's 2-GPU machine: at most 8 files into `out`."""
    import torch

    out, backend = Path(out), os.environ.get("COURSE_BACKEND", "nccl")
    out.mkdir(parents=True, exist_ok=True)
    summary = [
        f"torch {torch.__version__}, python {sys.version.split()[0]}, backend {backend}, "
        f"GPUs: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}"
    ]
    with tempfile.TemporaryDirectory() as work:
        for lesson in GPU_LESSONS:
            path = launcher.lesson_path(lesson)
            if lesson == "00" and "trace.recording" not in path.read_text():
                summary.append(f"{path.name}: skipped, it does not take --trace yet")
                continue
            folder = Path(work) / path.stem
            result = launcher.launch(
                path,
                2,
                ["--trace", folder],
                timeout=30,
                env={"COURSE_BACKEND": backend, "NCCL_NVLS_ENABLE": "0"},
            )
            log = "\n".join(result.lines + result.stuck) + "\n"
            (Path(work) / f"{path.stem}.log").write_text(log)
            said = [line for line in result.lines if "] trace: " in line]
            summary.append(
                f"{path.name}: exit {result.returncode} in {result.seconds:.1f} s; "
                f"{said[0] if said else 'no trace line (see its log)'}"
            )
            if (folder / "timeline.png").is_file():
                shutil.copy(folder / "timeline.png", out / f"nccl_{path.stem}.png")
            if lesson == "02" and (folder / "trace.json").is_file():
                shutil.copy(folder / "trace.json", out / "nccl_02_trace.json")
            if (folder / "rank0.json").is_file():
                summary += [
                    f"{path.stem}/rank0.json, event formats:",
                    *event_formats(folder / "rank0.json"),
                ]
        (out / "gpu_summary.txt").write_text("\n".join(summary) + "\n")
        per_rank = re.compile(r"rank\d+\.json$")  # the full per-rank traces: the big files
        for raw in (True, False):  # everything, or without the per-rank traces if too big
            with tarfile.open(out / "gpu_traces.tar.gz", "w:gz") as tar:
                keep = lambda t, raw=raw: t if raw or not per_rank.search(t.name) else None
                tar.add(work, "gpu_traces", filter=keep)
            if (out / "gpu_traces.tar.gz").stat().st_size < 15 * 2**20:
                break
    print("\n".join(summary))


LIVE_CELLS = [  # docs/instructors.md: a hanging cell on live ranks, as a notebook shows it
    "from course import live\nranks = live.start('00_hello', nproc=4)",
    "%%ranks\nimport torch, torch.distributed as dist\ndist.init_process_group('gloo')\n"
    "x = torch.tensor([dist.get_rank() + 1.0])",
    "%%ranks --timeout 3\nif dist.get_rank() != 1:  # rank 1 skips the collective\n"
    "    dist.all_reduce(x)",
    "ranks.stop()",
]


def capture_live():
    """A notebook on live ranks (course/live.py) whose cell hangs: the cell and what it showed."""
    import nbformat
    from nbclient import NotebookClient

    cells = [nbformat.v4.new_code_cell(c) for c in LIVE_CELLS]
    nb = nbformat.v4.new_notebook(cells=cells)
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    hang = nb.cells[2]
    said = "".join(o.get("text", "") for o in hang.outputs if o.output_type == "stream")
    error = [f"{o.ename}: {o.evalue}" for o in hang.outputs if o.output_type == "error"]
    text = [*(f">>> {line}" for line in hang.source.splitlines()), *tidy(said.splitlines()), *error]
    (OUTPUTS / "live_hang.txt").write_text("\n".join(text) + "\n")
    print("docs/outputs/live_hang.txt", flush=True)


def main():
    parts = sys.argv[1:] or [
        "broken",
        "traces",
        "overhead",
        "troubles",
        "raw",
        "pages",
        "live",
    ]  # gpu: if asked
    if "broken" in parts:
        capture_broken()
    if "traces" in parts:
        capture_traces([p for p in parts if p in TRACES] or None)
    if "overhead" in parts:
        capture_overhead()
    if "troubles" in parts:
        capture_troubles()
    if "raw" in parts:
        capture_raw()
    if "live" in parts:
        capture_live()
    if "pages" in parts:
        capture_pages([p for p in parts if p in PAGES] or None)
    if parts[0] == "gpu":
        capture_gpu(parts[1] if len(parts) > 1 else "out/gpu")


if __name__ == "__main__":
    main()
