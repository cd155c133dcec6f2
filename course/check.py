"""Exercise checks: run your function on N ranks, compare every rank with a single-process answer.

    python -m lessons.check 00                # lesson 00's exercises as in lessons/00_hello.py
    python -m lessons.check 00.1 --solution   # the reference solution, solutions/00_hello.py
    python -m lessons.check 00.1 --file mine.py
    check("00.1", mean_over_ranks)            # in a notebook: your function

The stubs you fill in are in the lesson; their checks are in exercises/NN_topic.py, which lists
them as EXERCISES = {id: (check function, names of the functions you write)}. A check runs on
every rank, calls your functions and returns (yours, expected); expected comes from a
single-process computation, never from collectives. A check runs on 4 ranks, then on the other
world sizes its file names in WORLD_SIZES (lessons 00-08: 3 or 2), so that an answer written for
4 ranks only fails. Your code runs in the lesson's namespace,
so torch, dist and the lesson's helpers are in scope. Each rank writes its verdicts as JSON
into a folder of the run; the runner reads them back from there, not from what was printed.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import json
import os
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from course import launcher

TIMEOUT_S = 120  # the whole check, start-up included; a stuck exercise is stopped after this
COLLECTIVE_TIMEOUT_S = "20"  # a collective in your code that waits this long fails instead
EXERCISES = launcher.ROOT / "exercises"
SOLUTIONS = launcher.ROOT / "solutions"


def lesson_file(exercise: str) -> Path:
    """An exercise ("02.1") or a lesson ("02") -> lessons/02_p2p.py"""
    return launcher.lesson_path(exercise.split(".")[0] + "_")


def exercise_file(exercise: str) -> Path:
    """An exercise ("02.1") or a lesson ("02") -> exercises/02_p2p.py, the lesson's checks"""
    return EXERCISES / lesson_file(exercise).name


def solution_file(exercise: str) -> Path:
    return SOLUTIONS / lesson_file(exercise).name


def _assigned(lesson: str, name: str) -> object:
    """A literal assigned to `name` in exercises/NN_topic.py, read without importing anything
    (the notebook kernel that launches checks never imports torch); None if there is none."""
    path = exercise_file(lesson)
    for node in ast.parse(path.read_text()).body if path.is_file() else []:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == name:
            if name == "EXERCISES":  # its values name functions: only its keys are literals
                return [key.value for key in node.value.keys]
            return ast.literal_eval(node.value)
    return None


def exercises_of(lesson: str) -> list[str]:
    """The exercise ids of a lesson, in order."""
    return _assigned(lesson, "EXERCISES") or []


def world_sizes_of(lesson: str) -> tuple[int, ...]:
    """The world sizes a lesson's checks run on, in order: its WORLD_SIZES, else only 4."""
    return tuple(_assigned(lesson, "WORLD_SIZES") or (4,))


def load(path: Path) -> ModuleType:
    """Import a file by path once per process (lesson names start with a digit)."""
    name = f"{path.parent.name}_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)  # defines things; the lesson's main() does not run
    return sys.modules[name]


def lesson_module(exercise: str) -> ModuleType:
    """The lesson, as its checks see it: exercises/NN_topic.py calls this for its helpers."""
    return load(lesson_file(exercise))


WIDTH = 160  # a verdict's line is cut here: a screen's width, not a wall of numbers
WHY = 400  # ...except a check's own sentence on why an answer fails: a few terminal lines
KEYS = 3  # a rank's differences shown in full; the others are named in one line
LINES = 12  # an exercise's lines of differences, all ranks together; further ranks get one line


def _short(x: object) -> str:
    """x in one line: a tensor by its shape, dtype and first values; anything else by repr."""
    import torch

    if isinstance(x, torch.Tensor):
        head = ", ".join(f"{v:.4g}" for v in x.detach().flatten()[:4].double().tolist())
        return f"tensor {tuple(x.shape)} {str(x.dtype)[6:]} [{head}{', ...' * (x.numel() > 4)}]"
    said = " ".join(repr(x).split())
    return said if len(said) <= WIDTH - 14 else said[: WIDTH - 17] + "..."


def _summary(yours: object, expected: object) -> list[str]:
    """What is wrong, in a few lines: shapes, the first differing entries, an obvious relation."""
    import torch

    if isinstance(yours, str) and expected is True:  # a check's words on why: whole, one line
        return [f"yours:    {' '.join(yours.split())}"[:WHY]]
    if not (isinstance(yours, torch.Tensor) and isinstance(expected, torch.Tensor)):
        return [f"yours:    {_short(yours)}", f"expected: {_short(expected)}"]
    if (
        yours.dim() == 2
        and yours.shape == expected.T.shape
        and torch.allclose(yours.T.double(), expected.double(), rtol=1e-4, atol=1e-5)
    ):
        return [f"yours is expected transposed: shape {tuple(yours.shape)}, expected's .T"]
    if yours.shape != expected.shape or yours.dtype != expected.dtype:
        return [f"yours:    {_short(yours)}", f"expected: {_short(expected)}"]
    if yours.is_complex():  # same dtype as expected's: compare real and imaginary parts
        yours, expected = torch.view_as_real(yours), torch.view_as_real(expected)
    a, b = yours.flatten().double(), expected.flatten().double()
    bad = (~torch.isclose(a, b, rtol=1.3e-6, atol=1e-5)).nonzero().flatten()
    at = lambda i: list(torch.unravel_index(torch.tensor(i), yours.shape)) if yours.dim() else []
    shown = "; ".join(
        f"{[int(j) for j in at(i)]} yours {a[i].item():.4g}, expected {b[i].item():.4g}"
        for i in bad[:2].tolist()
    )
    lines = [f"{len(bad)} of {a.numel()} differ, shape {tuple(yours.shape)}: {shown}"]
    factor = (a @ b / (b @ b)).item() if a.isfinite().all() and (b @ b) > 0 else 1.0
    if abs(factor - 1) > 1e-3 and torch.allclose(
        a, factor * b, rtol=1e-3, atol=1e-6 * b.abs().max()
    ):
        lines.append(f"yours = {factor:.4g} x expected, everywhere")
    return lines


def _close(yours: object, expected: object) -> bool:
    """torch.testing.assert_close's verdict with its default tolerances (same shape and dtype;
    floats within rtol and atol by dtype; NaN differs), without importing torch.testing: that
    costs each rank about half a second at start-up."""
    import torch

    if not (isinstance(yours, torch.Tensor) and isinstance(expected, torch.Tensor)):
        return False
    if yours.shape != expected.shape or yours.dtype != expected.dtype:
        return False
    yours, expected = yours.detach().cpu(), expected.detach().cpu()
    if not (expected.is_floating_point() or expected.is_complex()):
        return torch.equal(yours, expected)
    low = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}
    rtol, atol = {**low, torch.float32: (1.3e-6, 1e-5), torch.complex64: (1.3e-6, 1e-5)}.get(
        expected.dtype, (1e-7, 1e-7)
    )
    return torch.allclose(yours, expected, rtol=rtol, atol=atol)


def differences(yours: object, expected: object, name: str = "result") -> list[list]:
    """[name, lines saying how yours and expected differ] per part of a dict that differs (the
    ones that say why first); [] if they match."""
    import torch  # here, not at the top: a notebook kernel that only launches checks needs no torch

    if isinstance(yours, torch.Tensor):
        yours = yours.detach().cpu()
    if isinstance(expected, dict) and isinstance(yours, dict) and yours.keys() == expected.keys():
        keys = sorted(expected, key=lambda key: expected[key] is not True)  # the why-keys first
        return [d for key in keys for d in differences(yours[key], expected[key], key)]
    if isinstance(expected, torch.Tensor) or isinstance(yours, torch.Tensor):
        if _close(yours, expected):
            return []
    else:
        try:
            if bool(yours == expected):
                return []
        except Exception:
            pass
    try:
        return [[name, _summary(yours, expected)]]
    except Exception:  # an answer odd enough to trip the summary itself (complex, sparse, ...)
        return [[name, [f"yours:    {_short(yours)}", f"expected: {_short(expected)}"]]]


def samples(yours: object, expected: object, name: str = "result") -> dict[str, list]:
    """{name: [yours' first values, expected's]} per tensor, to see a rank's answer on another."""
    import torch

    if isinstance(expected, dict) and isinstance(yours, dict):
        return {
            k: v for key in expected for k, v in samples(yours.get(key), expected[key], key).items()
        }
    if not (isinstance(yours, torch.Tensor) and isinstance(expected, torch.Tensor)):
        return {}
    if yours.is_complex() or expected.is_complex() or yours.is_sparse or expected.is_sparse:
        return {}
    return {name: [t.detach().flatten()[:64].double().cpu().tolist() for t in (yours, expected)]}


def _shifted(mine: list, theirs: dict[int, list], rank: int, n: int) -> list[str]:
    """A line if yours on `rank` is another rank's expected answer, e.g. a peer off by one."""
    for other, sample in sorted(theirs.items()):
        if (
            other != rank
            and len(sample[1]) == len(mine[0])
            and mine[0]
            and all(abs(x - y) <= 1e-5 + 1e-4 * abs(y) for x, y in zip(mine[0], sample[1]))
        ):
            shift = (other - rank) % n - n * ((other - rank) % n > n // 2)  # -1, not n - 1
            return [f"yours is rank {other}'s expected answer: a rank shifted by {shift:+d}"]
    return []


def mismatch_lines(exercise: str, verdicts: dict[int, dict]) -> list[str]:
    """What the ranks that differ say, fit for a screen: ranks that say the same are one report;
    KEYS differences in full, LINES lines in all, then one line per further report."""
    reports: dict[str, list[int]] = {}
    for rank, v in sorted(verdicts.items()):
        if v["verdict"] == "mismatch":
            why = [[key, lines] for key, lines in v["why"]]
            for key, lines in why:
                theirs = {
                    r: w["samples"][key] for r, w in verdicts.items() if key in w.get("samples", {})
                }
                lines += _shifted(theirs.get(rank, [[]]), theirs, rank, len(verdicts))
            reports.setdefault(json.dumps(why), []).append(rank)
    out = []
    for text, ranks in reports.items():
        why, who = json.loads(text), f"[rank{'s' * (len(ranks) > 1)} {str(ranks)[1:-1]}]"
        keys = ", ".join(key for key, _ in why)
        if out and len(out) + 1 + sum(1 + len(lines) for _, lines in why[:KEYS]) > LINES:
            hints = [ln for _, ls in why for ln in ls if ln.startswith(("yours is", "yours ="))]
            hint = "".join(f"; {h}" for h in hints[:1])  # a relation, if one was seen
            out.append(f"{who} {exercise}: differs too, in: {keys}{hint}"[:WIDTH])
            continue
        out.append(f"{who} {exercise}: yours differs from expected")
        for key, lines in why[:KEYS]:
            out += [f"{who}   {key}:", *(f"{who}     {line}"[:WHY] for line in lines)]
        if len(why) > KEYS:
            more = ", ".join(key for key, _ in why[KEYS:])
            out.append(f"{who}   and {len(why) - KEYS} more: {more}"[:WIDTH])
    return out


def _worker(exercises: list[str], source: str | None, verdicts: Path) -> None:
    """One rank of a check, under the launcher: a verdict per exercise into verdicts/rankN.json."""
    from course import ranks

    lesson = lesson_module(exercises[0])
    checks = load(exercise_file(exercises[0])).EXERCISES
    namespace = dict(vars(lesson))
    if source:  # your version (a file or a notebook cell) replaces the lesson's stub
        exec(compile(Path(source).read_text(), source, "exec"), namespace)
    said = {}
    mine = verdicts / f"rank{os.environ['RANK']}.json"
    args = ranks.parser("").parse_args([])  # COURSE_TIMEOUT, COURSE_TRACE, ... from the launcher
    args.backend = getattr(lesson, "BACKEND", args.backend)  # a lesson that needs one (11: gloo)
    with ranks.setup(args, getattr(lesson, "NEEDS", None), trace=args.trace) as ctx:
        for exercise in exercises:
            check_fn, *names = checks[exercise]
            try:  # a stub raises on every rank alike, so the ranks stay in step and go on
                yours, expected = check_fn(ctx, **{name: namespace[name] for name in names})
            except NotImplementedError as err:
                said[exercise] = {"verdict": "not attempted", "why": str(err)}
            else:
                wrong, sampled = differences(yours, expected), samples(yours, expected)
                verdict = "mismatch" if wrong else "pass"
                said[exercise] = {"verdict": verdict, "why": wrong, "samples": sampled}
            mine.write_text(json.dumps(said))  # after each: a later crash keeps earlier verdicts
        # Every rank has written its verdicts before any exits: the launcher stops the others as
        # soon as one rank exits non-zero, which would cut a slower rank's verdict short.
        import torch.distributed as dist

        dist.barrier()
    raise SystemExit(0 if all(v["verdict"] == "pass" for v in said.values()) else 1)


def _run_at(
    exercises: list[str], source: str | Path | None, nproc: int, timeout: float, via: str
) -> tuple[dict[str, str], list[str]]:
    """One run of the checks on `nproc` ranks: ({id: status}, report lines)."""
    with tempfile.TemporaryDirectory(prefix="course-verdicts-") as folder:
        args = ["--worker", ",".join(exercises), "--verdicts", folder]
        if source:
            args += ["--source", str(Path(source).resolve())]
        env = {"COURSE_TIMEOUT": COLLECTIVE_TIMEOUT_S}
        result = launcher.launch("course.check", nproc, args, timeout, env, via=via)
        files = {rank: Path(folder) / f"rank{rank}.json" for rank in range(nproc)}
        said = {rank: json.loads(f.read_text()) for rank, f in files.items() if f.is_file()}
    status, lines = {}, []
    for exercise in exercises:
        verdicts = {rank: said[rank][exercise] for rank in said if exercise in said[rank]}
        kinds = {v["verdict"] for v in verdicts.values()}
        if "not attempted" in kinds:
            status[exercise] = "not attempted"
            lines.append(next(iter(verdicts.values()))["why"])  # the stub's own words
        elif len(verdicts) < nproc or result.returncode not in (0, 1):
            status[exercise] = "error"
        elif kinds == {"pass"}:
            status[exercise] = "pass"
        else:
            status[exercise] = "mismatch"
            lines += mismatch_lines(exercise, verdicts)
    if "error" in status.values():  # what the ranks said is the only clue: show all of it
        lines = result.lines + result.stuck + lines
    return status, lines


def run_check(
    exercises: list[str],
    source: str | Path | None = None,
    nproc: int | None = None,
    timeout: float = TIMEOUT_S,
    via: str = "forkserver",
) -> tuple[dict[str, str], list[str]]:
    """Check exercises (ids of one lesson): one run on `nproc` ranks, or, if None, one on each
    of the lesson's world sizes, where each exercise that passed so far goes on to the next.
    `source`: a file with your function(s), or None for the lesson's own. Returns ({id: status},
    report lines); status is "pass", "mismatch", "not attempted" or "error" (crashed, hung, or a
    rank said nothing)."""
    sizes = [nproc] if nproc else world_sizes_of(exercises[0])
    status, lines, passed = {}, [], list(exercises)
    for n, size in enumerate(sizes):
        now, said = _run_at(passed, source, size, timeout, via)
        if n and set(now.values()) != {"pass"}:  # right on the sizes before, wrong on this one
            before = " and ".join(map(str, sizes[:n]))
            lines.append(f"on {size} ranks (it passed on {before}), each rank says:")
        status.update(now)
        lines += said
        passed = [e for e in passed if now[e] == "pass"]
        if not passed:
            break
    return status, lines


def report(status: dict[str, str], lines: list[str], sizes: list[int]) -> None:
    """Say how each exercise went, the way a learner needs to read it."""
    if lines:
        print("\n".join(lines))
    for exercise, state in status.items():
        name = f"Exercise {exercise}:"
        if state == "pass":
            again = "".join(f", and on {n}" for n in sizes[1:])
            print(name, f"PASS on all {sizes[0]} ranks{again} (matches the single-process answer)")
        elif state == "not attempted":
            solution = solution_file(exercise).relative_to(launcher.ROOT)
            print(name, f"not attempted yet; the solution is in {solution}")
        elif state == "mismatch":
            print(name, "yours differs from the expected answer (per rank, above)")
        else:
            print(name, "your code failed or hung (output above)")


def check(
    exercise: str, *functions: Callable, nproc: int | None = None, timeout: float = TIMEOUT_S
) -> None:
    """In a notebook: run your function(s) on `nproc` ranks (None: on each of the lesson's world
    sizes) and check them. Returns None; raises
    AssertionError on a wrong answer or a crash; says so, without raising, if not attempted."""
    with tempfile.TemporaryDirectory() as folder:
        source = None
        if functions:
            source = Path(folder) / f"exercise_{exercise}.py"
            source.write_text("\n\n".join(textwrap.dedent(inspect.getsource(f)) for f in functions))
        status, lines = run_check([exercise], source, nproc, timeout)
    report(status, lines, [nproc] if nproc else world_sizes_of(exercise))
    if status[exercise] in ("mismatch", "error"):
        raise AssertionError(f"Exercise {exercise} did not pass")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("exercise", nargs="?", help="a lesson (02) or one exercise (02.1)")
    p.add_argument("--solution", action="store_true", help="check solutions/NN_topic.py instead")
    p.add_argument(
        "--file", help="check the functions in this file (run in the lesson's namespace)"
    )
    p.add_argument(
        "--nproc", type=int, help="one world size (default: 4, then the lesson's others)"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)  # set by run_check for each rank
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--verdicts", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return _worker(args.worker.split(","), args.source, Path(args.verdicts))
    if not args.exercise:
        p.error("name a lesson (00) or an exercise (00.1)")
    lesson = args.exercise.split(".")[0]
    try:
        lesson_file(lesson)
    except FileNotFoundError as err:
        p.error(f"{err}: name a lesson by its number, e.g. 00")
    ids = exercises_of(lesson)
    if not ids:
        p.error(f"lesson {lesson} has no exercises")
    if "." in args.exercise:
        if args.exercise not in ids:
            p.error(f"lesson {lesson} has no exercise {args.exercise}; it has {', '.join(ids)}")
        ids = [args.exercise]
    if args.file and not Path(args.file).is_file():
        p.error(f"--file {args.file}: no such file")
    if args.nproc is not None and args.nproc < 1:
        p.error(f"--nproc {args.nproc}: a world needs at least 1 rank")
    needs = getattr(lesson_module(ids[0]), "NEEDS", None)  # (what, test) of course/ranks.py
    if args.nproc is not None and needs and not needs[1](args.nproc):
        p.error(f"lesson {ids[0][:2]}'s checks need {needs[0]}, not --nproc {args.nproc}")
    source = solution_file(ids[0]) if args.solution else args.file
    # From a shell: fork the ranks from this process (it imports torch once; a forkserver would
    # import it a second time, beside the agent's own import here).
    status, lines = run_check(ids, source, args.nproc, via="fork")
    report(status, lines, [args.nproc] if args.nproc else world_sizes_of(ids[0]))
    sys.exit(0 if set(status.values()) == {"pass"} else 1)


if __name__ == "__main__":
    main()
