"""The classroom notebooks: one per lesson, generated from the lesson (tools/make_notebooks.py)
and current; the kernel never forks or touches CUDA, the live ranks run the lesson's own lines;
with the exercise cells replaced by the reference solutions every check passes. The live ranks
(course/live.py): state kept, a cell on some ranks, a hang stopped by a bound or an interrupt
with every rank's stack, restart(); an interrupted cell, or a restarted or killed kernel,
leaves no rank behind.
(nbval executes every notebook as shipped, through pytest's --nbval option in pyproject.toml.)"""

import asyncio
import threading
import time

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

from course import launcher
from course.check import load

from conftest import LESSONS, PROGRAMS, ROOT, lesson_ids

make_notebooks = load(ROOT / "tools" / "make_notebooks.py")  # a script, not a package
NOTEBOOKS = ROOT / "notebooks"


def notebook(path):
    return nbformat.read(NOTEBOOKS / f"{path.stem}.ipynb", as_version=4)


def role(cell):
    return cell.metadata.get("course", {}).get("role")


@pytest.mark.parametrize("path", LESSONS, ids=lesson_ids())
def test_notebook_exists_and_is_current(path):
    command = f"python tools/make_notebooks.py {path.stem[:2]}"
    assert not make_notebooks.stale(path), (
        f"notebooks/{path.stem}.ipynb is missing or stale: {command}"
    )


def kernel_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code" and not c.source.startswith("%%ranks")]


@pytest.mark.parametrize("path", LESSONS, ids=lesson_ids())
def test_the_kernel_never_forks_or_touches_cuda_and_the_ranks_run_the_lessons_own_code(path):
    """Kernel cells: no fork, no CUDA. %%ranks cells: the lesson's lines, in the lesson's order
    within a cell, nothing hand-copied (but main()'s `with` kept open, and the line saying so)."""
    nb = notebook(path)
    code = "\n".join(c.source for c in kernel_cells(nb))
    for forbidden in ("cuda", "multiprocessing", "mp.spawn", "fork", "!torchrun", "%run"):
        assert forbidden not in code, forbidden
    assert "live.start(" in code and "run_lesson(" in code
    lesson = [line.strip() for line in path.read_text().splitlines()]
    on_ranks = [c for c in nb.cells if c.source.startswith("%%ranks")]
    assert len(on_ranks) >= 4, "the walkthrough is missing"
    for cell in on_ranks:
        at = 0
        for line in cell.source.splitlines()[1:]:
            if "keep_open(" in line or line.startswith("# main()'s `with`"):
                continue
            assert line.strip() in lesson[at:], f"not the lesson's, or not in its order: {line}"
            at = lesson.index(line.strip(), at)


def test_solutions_pass_in_the_notebooks():
    """Every notebook's exercise cells replaced by their solutions, then its check cells, after
    one setup cell, in one kernel (started once: cheaper for CI): every check PASSes."""
    nb = nbformat.v4.new_notebook()
    for path in [p for p in LESSONS if (NOTEBOOKS / f"{p.stem}.ipynb").exists()]:
        solution = ROOT / "solutions" / path.name
        solutions = {e: stub for e, stub, _ in make_notebooks.exercise_regions(solution)}
        for cell in notebook(path).cells:
            if role(cell) == "exercise":
                cell.source = solutions[cell.metadata["course"]["exercise"]]
            if role(cell) in ("exercise", "check") or (role(cell) == "setup" and not nb.cells):
                nb.cells.append(cell)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    checks = [c for c in nb.cells if role(c) == "check"]
    assert len(checks) >= len(LESSONS)
    for cell in checks:
        said = "".join(o.get("text", "") for o in cell.outputs)
        assert "PASS on all 4 ranks" in said, said


LIVE = f"""\
from course import live
ranks = live.start({str(LESSONS[0])!r}, nproc=3)"""
JOIN = """\
%%ranks
import os, pathlib, torch, torch.distributed as dist
dist.init_process_group("gloo")
pathlib.Path({folder!r}, str(os.getpid())).touch()  # the test watches the ranks from outside
x = torch.tensor([dist.get_rank() + 1.0])"""


def live_ranks(folder):
    return launcher.still_running(int(p.name) for p in folder.iterdir())


def outputs(cell):
    return "".join(o.get("text", "") + "\n".join(o.get("traceback", [])) for o in cell.outputs)


def test_live_ranks_keep_state_run_on_some_ranks_and_show_a_hang_then_restart(tmp_path):
    """State persists between cells; `%%ranks 1` runs on rank 1 only; a collective that rank 1
    skips is stopped by the cell's bound: each rank's stack, no rank left; restart() brings them
    back with the cells that had run."""
    cells = [
        LIVE,
        JOIN.format(folder=str(tmp_path)),
        "%%ranks\ndist.all_reduce(x)\nprint(x.item())",
        "%%ranks 1\nprint('only me', x.item())",
        "%%ranks --timeout 4\nif dist.get_rank() != 1:\n    dist.all_reduce(x)",
        f"import os\nfrom course.launcher import still_running\n"
        f"print(len(os.listdir({str(tmp_path)!r})), 'ranks,', len(still_running(int(p) for p in "
        f"os.listdir({str(tmp_path)!r}))), 'running')",
        "ranks.restart()",
        "%%ranks\ndist.all_reduce(x)\nprint(x.item())",
        "ranks.stop()",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    said = [outputs(c) for c in nb.cells]
    assert said[2].splitlines() == [f"[rank {r}] 6.0" for r in range(3)], said[2]
    assert said[3] == "[rank 1] only me 6.0\n", said[3]
    hang = said[4]
    assert "where each rank was:" in hang and "[rank 1] had finished the cell" in hang, hang
    for rank in (0, 2):
        assert f"[rank {rank}] in all_reduce() called at <cell" in hang, hang
    assert "RanksFailed: not done after 4 s" in hang and "ranks.restart()" in hang, hang
    assert said[5] == "3 ranks, 0 running\n", said[5]
    assert "3 fresh ranks; ran again the 3 cells that had run" in said[6], said[6]
    # the replay summed x once (6 on every rank); this cell sums it again: 18
    assert said[7].splitlines() == [f"[rank {r}] 18.0" for r in range(3)], said[7]
    assert len(list(tmp_path.iterdir())) == 6 and not live_ranks(tmp_path)  # stop() ended them


def test_a_rank_that_dies_in_a_cell_is_named_with_its_exit_code(tmp_path):
    """A rank that leaves mid-cell (an abort in torch's C++ looks like this): the cell fails
    naming which rank left and how, in the error itself, where a notebook test's log shows it."""
    cells = [
        LIVE,
        JOIN.format(folder=str(tmp_path)),
        "%%ranks\nif dist.get_rank() == 1:\n    os.abort()\ndist.all_reduce(x)",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    said = outputs(nb.cells[2])
    assert "RanksFailed: a rank left (launcher: rank 1 failed first (exit code -6)" in said, said
    assert len(list(tmp_path.iterdir())) == 3 and not live_ranks(tmp_path)


def test_an_interrupt_stops_a_hanging_cell_and_its_ranks(tmp_path):
    """The kernel's interrupt (here nbclient's, at its cell timeout) ends a cell that hangs:
    each rank's stack is shown, no rank is left."""
    cells = [
        LIVE,
        JOIN.format(folder=str(tmp_path)),
        "%%ranks\nif x.item() == 1:\n    dist.barrier()",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = NotebookClient(
        nb,
        kernel_name="python3",
        interrupt_on_timeout=True,
        timeout_func=lambda cell: 6 if "barrier" in cell.source else 120,  # a hang: interrupt
    )
    with pytest.raises((CellTimeoutError, CellExecutionError)):
        client.execute()
    said = outputs(nb.cells[2])
    assert "[rank 0] in barrier() called at <cell" in said, said
    assert "[rank 1] had finished the cell" in said and "RanksFailed: interrupted" in said, said
    assert len(list(tmp_path.iterdir())) == 3 and not live_ranks(tmp_path)


@pytest.mark.parametrize("now", [False, True], ids=["restarted", "killed"])
def test_restarting_the_kernel_leaves_no_rank_running(tmp_path, now):
    """A restart (the kernel exits: atexit stops the ranks) and a killed kernel (SIGKILL: each
    rank sees its kernel gone and ends itself, and its children): no rank left after either."""
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        for cell in (LIVE, JOIN.format(folder=str(tmp_path))):
            reply = client.execute_interactive(cell, timeout=120)
            assert reply["content"]["status"] == "ok", reply["content"]
        assert len(live_ranks(tmp_path)) == 3
        manager.restart_kernel(now=now)
        deadline = time.monotonic() + 20
        while live_ranks(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not live_ranks(tmp_path), "ranks outlived their kernel"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_an_interrupted_cell_leaves_no_rank_behind(tmp_path):
    """A cell interrupted while its ranks wait stops them all. nbval interrupts a cell that runs
    past --nbval-cell-timeout through the kernel manager's interrupt_kernel(); this test calls
    the same once every rank has started (a fixed timeout raced the ranks' start on a busy
    machine: the cell was interrupted before any rank ran, and the test proved nothing)."""
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "from course.launcher import run_lesson\n"
                f"run_lesson({str(PROGRAMS / 'hang.py')!r}, nproc=4, timeout=300, "
                f"env={{'PIDS': {str(tmp_path)!r}}})"
            )
        ]
    )
    client = NotebookClient(
        nb,
        timeout=150,  # nbclient's own interrupt, should the one below never come
        kernel_name="python3",
        interrupt_on_timeout=True,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )

    def ranks():  # each rank wrote its pid into tmp_path
        return launcher.still_running(int(p.name) for p in tmp_path.iterdir())

    seen = []  # how many ranks ran when the interrupt came

    def interrupt_once_every_rank_runs():
        deadline = time.monotonic() + 120
        while len(ranks()) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)  # three ranks in their all_reduce, rank 2 asleep
        seen.append(len(ranks()))
        asyncio.run(client.km.interrupt_kernel())  # nbclient's manager is the async one

    watcher = threading.Thread(target=interrupt_once_every_rank_runs)
    watcher.start()
    with pytest.raises(CellExecutionError) as stopped:
        client.execute()
    watcher.join()
    assert seen == [4], "the ranks never all started, so this test proved nothing"
    assert "KeyboardInterrupt" in str(stopped.value)
    assert not ranks()  # the interrupted run_lesson stopped them all
