"""Exercise checks: run your function on N ranks, compare every rank with a single-process answer.

    python -m lessons.check 00                # lesson 00's exercises as in lessons/00_hello.py
    python -m lessons.check 00.1 --solution   # the reference solution, solutions/00_hello.py
    python -m lessons.check 00.1 --file mine.py
    check("00.1", mean_over_ranks)            # in a notebook: your function, on 4 ranks

A lesson lists its exercises as EXERCISES = {id: (check function, names of the functions you
write)}. The check function runs on every rank, calls your functions and returns
(yours, expected); expected comes from a single-process computation, never from collectives.
Your code runs in the lesson's namespace, so torch, dist and the lesson's helpers are in scope.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import tempfile
import textwrap
from pathlib import Path

from course import launcher

TIMEOUT_S = 120  # the whole check, start-up included; a stuck exercise is stopped after this
COLLECTIVE_TIMEOUT_S = "20"  # a collective in your code that waits this long fails instead
VERDICTS = ("PASS", "MISMATCH", "NOT ATTEMPTED")  # what each rank says of each exercise


def lesson_file(exercise):
    """"02.1" or "02" -> lessons/02_p2p.py"""
    return launcher.lesson_path(exercise.split(".")[0] + "_")


def solution_file(exercise):
    return launcher.ROOT / "solutions" / lesson_file(exercise).name


def exercises_of(lesson):
    """The exercise ids a lesson defines, read without importing it (no torch in the kernel)."""
    import ast

    tree = ast.parse(lesson_file(lesson).read_text())
    found = [n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
             and any(getattr(t, "id", "") == "EXERCISES" for t in n.targets)]
    return [key.value for key in found[0].keys] if found else []


def _load(path):
    spec = importlib.util.spec_from_file_location(f"lesson_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines things; the lesson's main() does not run
    return module


def _differences(yours, expected, name="result"):
    """Lines saying where yours and expected differ (per entry of a dict); [] if they match."""
    import torch  # here, not at the top: a notebook kernel that only launches checks needs no torch

    if isinstance(yours, torch.Tensor):
        yours = yours.detach().cpu()
    if isinstance(expected, dict) and isinstance(yours, dict) and yours.keys() == expected.keys():
        return [line for key in expected for line in _differences(yours[key], expected[key], key)]
    try:
        torch.testing.assert_close(yours, expected, check_device=False)
        return []
    except (AssertionError, TypeError, ValueError) as err:
        why = str(err).strip().split("\n")[0]
    try:  # what assert_close cannot compare (strings, objects) may still be plainly equal
        if not isinstance(expected, torch.Tensor) and bool(yours == expected):
            return []
    except Exception:
        pass
    return [f"  {name}: {why}", f"    yours:    {yours}", f"    expected: {expected}"]


def _worker(exercises, source):
    """One rank of a check, under torchrun: says PASS, MISMATCH or NOT ATTEMPTED per exercise."""
    from course import ranks

    lesson = _load(lesson_file(exercises[0]))
    namespace = dict(vars(lesson))
    if source:  # your version (a file or a notebook cell) replaces the lesson's stub
        exec(compile(Path(source).read_text(), source, "exec"), namespace)
    with ranks.setup(ranks.parser("").parse_args([]), getattr(lesson, "NEEDS", None)) as ctx:
        failed = False
        for exercise in exercises:
            check_fn, *names = lesson.EXERCISES[exercise]
            try:  # a stub raises on every rank alike, so the ranks stay in step and go on
                yours, expected = check_fn(ctx, **{name: namespace[name] for name in names})
            except NotImplementedError as err:
                ranks.print_rank(f"NOT ATTEMPTED {exercise}: {err}")
                failed = True
                continue
            wrong = _differences(yours, expected)
            ranks.print_rank(f"MISMATCH {exercise}\n" + "\n".join(wrong) if wrong
                              else f"PASS {exercise}")
            failed = failed or bool(wrong)
        # Every rank has said its verdict before any exits: torchrun stops the others as soon as
        # one rank exits non-zero, which would cut a slower rank's verdict short.
        import torch.distributed as dist

        dist.barrier()
    raise SystemExit(1 if failed else 0)


def run_check(exercises, source=None, nproc=4, timeout=TIMEOUT_S):
    """Check exercises (ids of one lesson) on `nproc` ranks in one run. `source`: a file with
    your function(s), or None for the lesson's own. Returns ({id: status}, output lines); status
    is "pass", "mismatch", "not attempted" or "error" (crashed, hung, or a rank said nothing)."""
    args = ["--worker", ",".join(exercises)]
    if source:
        args += ["--source", str(Path(source).resolve())]
    result = launcher.launch("course.check", nproc, args, timeout,
                             {"COURSE_TIMEOUT": COLLECTIVE_TIMEOUT_S})
    lines = result.lines + result.stuck
    said = {}  # (exercise, rank) -> verdict
    for line in lines:
        if match := launcher.RANK_LINE.match(line):
            verdict, _, rest = next(((v, 0, line[match.end() + len(v):]) for v in VERDICTS
                                     if line[match.end():].startswith(v)), (None, 0, ""))
            if verdict:
                said[rest.split(":")[0].strip(), int(match[1])] = verdict
    status = {}
    for exercise in exercises:
        verdicts = [said.get((exercise, rank)) for rank in range(nproc)]
        if "NOT ATTEMPTED" in verdicts:
            status[exercise] = "not attempted"
        elif None in verdicts or result.returncode not in (0, 1):
            status[exercise] = "error"
        else:
            status[exercise] = "pass" if set(verdicts) == {"PASS"} else "mismatch"
    return status, lines


def report(status, lines, nproc):
    """Say how each exercise went, the way a learner needs to read it."""
    for exercise, state in status.items():
        if state == "pass":
            print(f"Exercise {exercise}: PASS on all {nproc} ranks "
                  "(matches the single-process answer)")
        elif state == "not attempted":
            solution = solution_file(exercise).relative_to(launcher.ROOT)
            print(f"Exercise {exercise}: not attempted yet — the solution is in {solution}")
        elif state == "mismatch":
            print("\n".join(line for line in _blocks(lines, f"MISMATCH {exercise}")))
            print(f"Exercise {exercise}: yours differs from the expected answer (per rank, above)")
        else:
            print("\n".join(lines))
            print(f"Exercise {exercise}: your code failed or hung (output above)")


def _blocks(lines, header):
    """The lines each rank printed under `header` (its own line and the indented ones after it)."""
    keep, inside = [], set()
    for line in lines:
        match = launcher.RANK_LINE.match(line)
        if match:
            body = line[match.end():]
            if body.startswith(header):
                inside.add(match[1])
            elif not body.startswith(" "):
                inside.discard(match[1])
            if match[1] in inside:
                keep.append(line)
    return keep


def check(exercise, *functions, nproc=4, timeout=TIMEOUT_S):
    """In a notebook: run your function(s) on `nproc` ranks and check them. Returns None; raises
    AssertionError on a wrong answer or a crash; says so, without raising, if not attempted."""
    with tempfile.TemporaryDirectory() as folder:
        source = None
        if functions:
            source = Path(folder) / f"exercise_{exercise}.py"
            source.write_text("\n\n".join(textwrap.dedent(inspect.getsource(f)) for f in functions))
        status, lines = run_check([exercise], source, nproc, timeout)
    report(status, lines, nproc)
    if status[exercise] in ("mismatch", "error"):
        raise AssertionError(f"Exercise {exercise} did not pass")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exercise", nargs="?", help="a lesson (02) or one exercise (02.1)")
    p.add_argument("--solution", action="store_true", help="check solutions/NN_topic.py instead")
    p.add_argument("--file", help="check the functions in this file instead")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # set by run_check for each rank
    p.add_argument("--source", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return _worker(args.worker.split(","), args.source)
    if not args.exercise:
        p.error("name a lesson (00) or an exercise (00.1)")
    ids = [args.exercise] if "." in args.exercise else exercises_of(args.exercise)
    source = solution_file(ids[0]) if args.solution else args.file
    status, lines = run_check(ids, source, args.nproc)
    report(status, lines, args.nproc)
    sys.exit(0 if set(status.values()) == {"pass"} else 1)


if __name__ == "__main__":
    main()
