"""The classroom notebooks: one per lesson, generated from the lesson (tools/make_notebooks.py)
and current; nothing in them forks the kernel or touches CUDA; with the exercise cells replaced
by the reference solutions every check passes; an interrupted cell leaves no rank behind.
(nbval executes every notebook as shipped, through pytest's --nbval option in pyproject.toml.)"""

import threading
import time

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError

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


@pytest.mark.parametrize("path", LESSONS, ids=lesson_ids())
def test_notebook_never_forks_or_touches_cuda_in_the_kernel(path):
    code = "\n".join(c.source for c in notebook(path).cells if c.cell_type == "code")
    for forbidden in ("cuda", "multiprocessing", "mp.spawn", "fork", "!torchrun", "%run"):
        assert forbidden not in code, forbidden
    assert "run_lesson(" in code


@pytest.mark.parametrize(
    "path", [p for p in LESSONS if make_notebooks.exercise_regions(p)], ids=lesson_ids()
)
def test_solutions_pass_in_the_notebook(path):
    """Setup cell, every exercise cell replaced by its solution, every check cell: all PASS."""
    solutions = {
        e: stub for e, stub, _ in make_notebooks.exercise_regions(ROOT / "solutions" / path.name)
    }
    nb = notebook(path)
    cells = []
    for cell in nb.cells:
        if role(cell) == "exercise":
            cell.source = solutions[cell.metadata["course"]["exercise"]]
        if role(cell) in ("setup", "exercise", "check"):
            cells.append(cell)
    nb.cells = cells
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    checks = [c for c in nb.cells if role(c) == "check"]
    assert checks
    for cell in checks:
        said = "".join(o.get("text", "") for o in cell.outputs)
        assert "PASS on all 4 ranks" in said, said


def test_an_interrupted_cell_leaves_no_rank_behind(tmp_path):
    """nbval interrupts a cell that runs past --nbval-cell-timeout; the ranks must go too."""
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
        timeout=12,
        kernel_name="python3",
        interrupt_on_timeout=True,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )

    def ranks():  # each rank wrote its pid into tmp_path
        return launcher.still_running(int(p.name) for p in tmp_path.iterdir())

    seen = []  # how many ranks ran, while the cell ran
    watcher = threading.Thread(
        target=lambda: [seen.append(len(ranks())) or time.sleep(0.5) for _ in range(30)]
    )
    watcher.start()
    with pytest.raises(Exception) as stopped:
        client.execute()
    watcher.join()
    assert max(seen) == 4, "the ranks never started, so this test proved nothing"
    assert isinstance(stopped.value, CellTimeoutError) or "KeyboardInterrupt" in str(stopped.value)
    assert not ranks()  # the interrupted run_lesson stopped them all
