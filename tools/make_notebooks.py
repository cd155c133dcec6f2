"""Write notebooks/NN_topic.ipynb for every lesson, from the lesson itself: nothing is hand-copied.

    python tools/make_notebooks.py              # (re)write and execute every notebook
    python tools/make_notebooks.py 02 06        # only these lessons
    python tools/make_notebooks.py --check      # exit 1 if a committed notebook is stale

A notebook holds: the lesson's docstring as its narrative; a cell that runs the lesson on 4 ranks
through course.launcher.run_lesson (torch's elastic launcher, ranks forked from a forkserver: the
kernel never touches CUDA); the figures that run saved; then, per exercise, the stub from the
lesson's marked region for the learner to edit and a cell that checks it on 4 ranks.

Notebooks are stored executed, so nbval can compare their outputs. Each is executed twice: a
cell whose output differs between the two runs (after tests/nbval_sanitize.cfg's substitutions),
or that prints a duration, is tagged nbval-ignore-output; every other cell is compared in CI.
"""

import argparse
import ast
import re
import sys
import textwrap
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SANITIZE = ROOT / "tests" / "nbval_sanitize.cfg"
CELL_TIMEOUT_S = 600  # generous: run_lesson's own timeout (300 s) stops a stuck lesson first
# Extra runs a notebook shows after the plain one, e.g. a small benchmark that draws a figure.
EXTRA_RUNS = {"03_collectives": [["--bench"]]}
SETUP = """\
# The ranks are started by course/launcher.py (torch's elastic launcher, as torchrun does)
# from a helper process this kernel starts once; the kernel never joins a group or touches
# CUDA, it prints what they said, in rank order. Exercise cells' type hints are not evaluated.
from __future__ import annotations

from pathlib import Path

from course.launcher import run_lesson, warm_up

warm_up()  # starts the helper now (it imports torch): the first run is then quick

import torch
import torch.distributed as dist
from IPython.display import Image, display

from course.check import check"""


LIST_ITEM = re.compile(r"(\d+[.)]|[-*]) ")  # a line that starts an item of a list
COMMAND = re.compile(r"(torchrun|python|\[rank|--|\$ |[A-Z_]+=|\.\.\.|#|\s)")  # not prose


def prose(text):
    """Lines of text as Markdown paragraphs: lines joined into sentences, list items kept apart
    (and a blank line before a list, or Markdown runs it into the paragraph)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.strip("\n")):
        lines = []
        for line in block.strip().splitlines():
            item = LIST_ITEM.match(line.strip())
            if item and lines and not LIST_ITEM.match(lines[-1]):
                lines += [""]
            if item or not lines or not lines[-1]:
                lines.append(line.strip())
            else:
                lines[-1] += " " + line.strip()
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def is_heading(line):
    """ "Run it", "What you should see (...)": no sentence in it outside brackets."""
    bare = re.sub(r"\([^)]*\)", "", line.strip())
    return not re.search(r"[.:;] ", bare) and len(line.strip()) < 100


def docstring_to_markdown(doc):
    """The lesson docstring's layout (a title; unindented headings over indented bodies;
    unindented prose) in Markdown. Bodies of commands or output become code blocks, where a line
    of prose becomes a comment; other bodies, and the unindented prose, become paragraphs."""
    lines = doc.strip("\n").splitlines()
    title, i = [], 0
    while i < len(lines) and lines[i].strip():  # the title may take more than one line
        title.append(lines[i].strip())
        i += 1
    out = [f"# {' '.join(title)}", ""]
    text = []  # unindented prose so far, not yet written out
    while i < len(lines):
        line, body, j = lines[i], [], i + 1
        while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
            body.append(lines[j])
            j += 1
        if not line.strip():
            i += 1
            continue
        if not any(b.strip() for b in body) or not is_heading(line):  # prose, not a heading
            text += [line, *body]
            i = j
            continue
        if text:
            out += [prose("\n".join(text)), ""]
            text = []
        block = textwrap.dedent("\n".join(body)).strip("\n")
        out += [f"**{line.strip()}**", ""]
        if re.search(r"^(torchrun|python|\[rank|--|\$ |[A-Z_]+=)", block, re.M):
            code = [b if COMMAND.match(b) or not b else f"# {b}" for b in block.splitlines()]
            out += ["```\n" + "\n".join(code) + "\n```", ""]
        else:
            out += [prose(block), ""]
        i = j
    if text:
        out += [prose("\n".join(text)), ""]
    return "\n".join(out).strip() + "\n"


def exercise_regions(path):
    """[(exercise id, stub source, [function names])] in the order the lesson defines them."""
    source = path.read_text()
    found = []
    # Region ex-NN-K holds exercise NN.K (docs snippets allow no dot in a region's name).
    for match in re.finditer(
        r"# --8<-- \[start:ex-(\d\d)-(\d+)\]\n(.*?)# --8<-- \[end:ex-\1-\2\]", source, re.S
    ):
        stub = match[3].rstrip() + "\n"
        names = [f.name for f in ast.parse(stub).body if isinstance(f, ast.FunctionDef)]
        found.append((f"{match[1]}.{match[2]}", stub, names))
    return found


def build(path):
    """The notebook for one lesson, unexecuted."""
    nb = nbformat.v4.new_notebook()
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["kernelspec"] = kernel
    stem = path.stem
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    cells = [
        nbformat.v4.new_markdown_cell(docstring_to_markdown(doc)),
        nbformat.v4.new_markdown_cell(
            f"This notebook runs `lessons/{path.name}` on 4 ranks (gloo on CPU, NCCL on GPUs) and "
            "shows what every rank printed, rank by rank. Run the cells from the top; in "
            "JupyterLab, **Kernel → Restart Kernel and Clear Outputs of All Cells…** resets it. "
            "The exercise cells are yours to edit."
        ),
        _cell(SETUP, "setup"),
        _cell(f'run_lesson("{stem}", nproc=4)', "run"),
    ]
    for extra in EXTRA_RUNS.get(stem, []):
        cells.append(_cell(f'run_lesson("{stem}", nproc=4, args={extra!r})', "run"))
    if "args.out" in path.read_text():  # the lesson saves figures: show this run's
        cells.append(
            _cell(
                f'for figure in sorted(Path("out").glob("{stem[:2]}_*.png")):\n'
                "    display(Image(filename=figure))",
                "figures",
            )
        )
    for exercise, stub, names in exercise_regions(path):
        cells += [
            nbformat.v4.new_markdown_cell(
                f"## Exercise {exercise}\n\nEdit the function below, run the cell, then run the "
                "check under it: it runs your code on 4 ranks and compares every rank with a "
                f"single-process answer. Stuck? The solution is in `solutions/{path.name}`."
            ),
            _cell(stub.rstrip(), "exercise", exercise),
            _cell(f'check("{exercise}", {", ".join(names)})', "check", exercise),
        ]
    nb.cells = cells
    return nb


def _cell(source, role, exercise=None):
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["course"] = {"role": role, **({"exercise": exercise} if exercise else {})}
    return cell


def sanitized(cell):
    """The cell's text outputs after the same substitutions nbval makes."""
    patterns = re.findall(r"^regex: (.*)$\n^replace: (.*)$", SANITIZE.read_text(), re.M)
    text = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for o in cell.get("outputs", [])
    )
    for regex, replace in patterns:
        text = re.sub(regex, replace, text)
    return text


def execute(nb):
    NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()
    return nb


def write(path):
    target = NOTEBOOKS / f"{path.stem}.ipynb"
    first = execute(build(path))
    second = execute(build(path))
    for a, b in zip(first.cells, second.cells):
        # Varying: different in the two runs, or timed (what a timing decides can flip under load).
        if a.cell_type == "code" and (sanitized(a) != sanitized(b) or "DURATION" in sanitized(b)):
            b.metadata["tags"] = ["nbval-ignore-output"]
    nbformat.write(second, target)
    print(f"wrote {target.relative_to(ROOT)}")


def stale(path):
    """True if the committed notebook's cells are not what the lesson would generate now."""
    target = NOTEBOOKS / f"{path.stem}.ipynb"
    if not target.exists():
        return True
    have, want = nbformat.read(target, as_version=4), build(path)
    cells = [[(c.cell_type, c.source) for c in nb.cells] for nb in (have, want)]
    return cells[0] != cells[1]


def lessons(selected):
    every = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))
    return [p for p in every if not selected or p.stem[:2] in selected]


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("lessons", nargs="*", help="lesson numbers (default: all)")
    p.add_argument("--check", action="store_true", help="only say which notebooks are stale")
    args = p.parse_args()
    if args.check:
        old = [p.stem for p in lessons(args.lessons) if stale(p)]
        print(
            "stale: " + ", ".join(old) + "\nregenerate: python tools/make_notebooks.py"
            if old
            else "every notebook is current"
        )
        sys.exit(1 if old else 0)
    NOTEBOOKS.mkdir(exist_ok=True)
    for path in lessons(args.lessons):
        write(path)


if __name__ == "__main__":
    main()
