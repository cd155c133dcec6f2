"""Write notebooks/NN_topic.ipynb for every lesson, from the lesson itself: nothing is hand-copied.

    python tools/make_notebooks.py              # (re)write and execute every notebook
    python tools/make_notebooks.py 02 06        # only these lessons
    python tools/make_notebooks.py --check      # exit 1 if a committed notebook is stale

A notebook holds: the lesson's docstring as its narrative; a cell that starts 4 live ranks
(course/live.py); the lesson's own code, taken from the file, cell by cell in %%ranks cells
that run on those ranks: its imports and constants, then main()'s steps, each after the
functions it is the first to use; per exercise, the stub from the lesson's marked region for
the learner to edit and a cell that checks it on 4 ranks (and on the lesson's other world
size); last, the whole lesson in one run (course.launcher.run_lesson) and the figures it
saved. The kernel never touches CUDA.

Notebooks are stored executed, so nbval can compare their outputs. Each is executed twice: a
cell whose output differs between the two runs (after tests/nbval_sanitize.cfg's substitutions),
or that prints a duration, is tagged nbval-ignore-output; every other cell is compared in CI,
but for the whole-lesson run at the end (nbval-skip: CI runs every lesson already).
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
# This kernel starts the ranks and shows what they print; it never joins a group or touches
# CUDA. course/live.py: 4 live ranks, started by torch's elastic launcher (as torchrun starts
# them) from a warm helper process. Exercise cells' type hints are not evaluated.
from __future__ import annotations

from pathlib import Path

from course import live
from course.launcher import run_lesson, warm_up

warm_up()  # starts the helper now (it imports torch): the ranks then start quickly

import torch
import torch.distributed as dist
from IPython.display import Image, display

from course.check import check"""
INTRO = """\
This notebook steps through `lessons/{name}` on 4 live ranks (gloo on CPU, NCCL on GPUs). The
next cell starts them; they stay up until the kernel stops. A cell that starts with `%%ranks`
runs on every rank, in the lesson's own namespace, and shows what each rank printed, rank by
rank: the next cell sees what the last one left, so you can change a cell and run it again.
`%%ranks 0 1` runs a cell on ranks 0 and 1 only; `%%ranks --timeout 20` bounds it.

A cell that hangs (a collective that one rank skips) is stopped by its bound or by
**Kernel → Interrupt Kernel**: every rank's stack is shown and the ranks are stopped;
`ranks.restart()` starts fresh ones and runs again the cells that had run. Run the cells from
the top; in JupyterLab, **Kernel → Restart Kernel and Clear Outputs of All Cells…** starts over
(the ranks end with the kernel). The exercise cells at the end are yours to edit."""
IMPORTS = "## The lesson's imports and constants\n\nThe top of the file, run on every rank."
MAIN = """\
## main(), step by step

First its flags (no flags here: the lesson's defaults) and the process group. Then `main()`'s
body, a step per cell; before a step, the lesson's functions it is the first to use. Where
`main()` holds a block open with `with ... as ctx:`, the notebook keeps it open with
`keep_open(...)` until the ranks stop."""
REST = "## The rest of the lesson\n\nFunctions `main()` does not call (the exercises use them)."
WHOLE = """\
## The whole lesson in one run

`lessons/{name}` from start to end on 4 fresh ranks, as `torchrun --nproc-per-node 4` runs it."""


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
        nbformat.v4.new_markdown_cell(INTRO.format(name=path.name)),
        _cell(SETUP, "setup"),
        _cell(f'ranks = live.start("{stem}", nproc=4)', "start"),
    ]
    cells += walkthrough(path)
    exercises = exercise_regions(path)
    for exercise, stub, names in exercises:
        cells += [
            nbformat.v4.new_markdown_cell(
                f"## Exercise {exercise}\n\nEdit the function below, run the cell, then run the "
                "check under it: it runs your code on 4 fresh ranks and compares every rank with "
                f"a single-process answer. Stuck? The solution is in `solutions/{path.name}`."
            ),
            _cell(stub.rstrip(), "exercise", exercise),
            _cell(f'check("{exercise}", {", ".join(names)})', "check", exercise),
        ]
    cells.append(nbformat.v4.new_markdown_cell(WHOLE.format(name=path.name)))
    cells.append(_cell(f'run_lesson("{stem}", nproc=4)', "run"))
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
    nb.cells = cells
    return nb


MARKER = re.compile(r"^\s*# --8<-- \[(start|end):[\w-]+\]\s*$")


def _text(lines, first, last):
    """Source lines first..last (1-based, inclusive) as a cell: region markers and blank lines
    at either end dropped, dedented."""
    kept = [line for line in lines[first - 1 : last] if not MARKER.match(line)]
    return textwrap.dedent("\n".join(kept)).strip("\n")


def _names(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _start(node):
    return min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])


def _flatten(body, after):
    """main()'s statements as steps [(first line, node)]: a `with` is opened for good
    (keep_open) and its body follows; a try around it whose only other part is `finally`
    (teardown, done as the ranks stop) gives its body. `after`: the line after which the
    first statement's leading comments start."""
    steps = []
    for node in body:
        if isinstance(node, ast.With):
            steps.append((after + 1, node))  # the header: keep_open(...)
            steps += _flatten(node.body, node.body[0].lineno - 1)
        elif isinstance(node, ast.Try) and not node.handlers and _holds_with(node):
            steps += _flatten(node.body, node.lineno)  # the finally: teardown, as the ranks stop
        else:
            steps.append((after + 1, node))
        after = node.end_lineno
    return steps


def _holds_with(node):
    return any(isinstance(n, ast.With) for n in node.body)


def _kept_open(lines, first, node):
    """A `with` header as statements that enter its contexts and leave them open."""
    comments = _text(lines, first, node.lineno - 1)
    said = [comments] if comments else []
    said.append("# main()'s `with` holds this open for its block; here it stays open till the end")
    for item in node.items:
        expr = ast.get_source_segment("\n".join(lines), item.context_expr)
        target = ast.get_source_segment("\n".join(lines), item.optional_vars or item.context_expr)
        said.append(f"{target} = keep_open({expr})" if item.optional_vars else f"keep_open({expr})")
    return "\n".join(said)


def walkthrough(path):
    """The lesson's own code, in its order, on the live ranks: its imports and constants; then
    main(), step by step, each step preceded by the lesson's functions it is the first to use;
    then the functions main() never uses. Exercise stubs are left to the exercise cells."""
    source = path.read_text()
    lines, tree = source.splitlines(), ast.parse(source)
    stubs = {n for _, _, names in exercise_regions(path) for n in names}
    defs = {
        n.name: n
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name not in stubs | {"main"}
    }
    top, after, run = [], tree.body[0].end_lineno, None  # after the docstring
    for node in tree.body[1:]:
        plain = not isinstance(node, (ast.FunctionDef, ast.ClassDef))
        if plain and not (isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)):
            run = run or after + 1  # a run of plain statements, with the lines between them
            top = [*top[: -1 if run <= after else None], _text(lines, run, node.end_lineno)]
        else:
            run = None
        after = node.end_lineno
    cells = [_markdown(IMPORTS), _ranks("\n\n".join(top), "imports")]
    shown = set()

    def functions_for(node):  # the lesson's functions `node` uses, and theirs, not yet shown
        wanted, todo = set(), _names(node) & set(defs)
        while todo:
            name = todo.pop()
            wanted.add(name)
            todo |= (_names(defs[name]) & set(defs)) - wanted
        out = []
        for name in sorted(wanted - shown, key=lambda n: defs[n].lineno):
            node = defs[name]
            doc = ast.get_docstring(node) or ""
            said = doc.split("\n\n")[0].replace("\n", " ")
            out += [_markdown(f"### `{name}`\n\n{said}".strip()), _function(lines, node)]
        shown.update(wanted)
        return out

    main = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"), None)
    if main:
        steps = _flatten(main.body, main.body[0].lineno - 1)
        opening = next((i for i, (_, n) in enumerate(steps) if isinstance(n, ast.With)), None)
        flags = steps[: opening or 0] or steps[:1]  # before main's `with`: the flags, setup
        cells += functions_for(ast.Module([n for _, n in flags], []))
        cells += [
            _markdown(MAIN),
            _ranks(_text(lines, flags[0][0], flags[-1][1].end_lineno), "main"),
        ]
        for group in _groups(steps[len(flags) :], _regions(lines, main)):
            if isinstance(group[0][1], ast.With):
                cells.append(_ranks(_kept_open(lines, *group[0]), "main"))
                continue
            cells += functions_for(ast.Module([n for _, n in group], []))
            text = "\n".join(_text(lines, first, n.end_lineno) for first, n in group)
            cells.append(_ranks(text, "main"))
    rest = [n for n in defs if n not in shown]
    if rest:
        cells.append(_markdown(REST))
        for name in rest:
            cells += functions_for(defs[name])
    return cells


def _regions(lines, main):
    """(first, last) lines of each marked region inside main(): its steps make one cell."""
    spans, starts = [], {}
    for number in range(main.lineno, main.end_lineno + 1):
        if m := MARKER.match(lines[number - 1]):
            name = lines[number - 1].split(":")[1].split("]")[0]
            if m[1] == "start":
                starts[name] = number
            elif name in starts:
                spans.append((starts.pop(name), number))
    return spans


def _groups(steps, regions):
    """main()'s steps, a cell each; but an assignment joins the step after it, the steps of a
    region go together, and a step that may `return` (this rank's part of main() ends there,
    the others' goes on) takes every step after it: the ranks must run them in one cell."""
    groups, group = [], []
    for i, (first, node) in enumerate(steps):
        if isinstance(node, ast.With):
            groups += [group, [(first, node)]] if group else [[(first, node)]]
            group = []
            continue
        group.append((first, node))
        if any(isinstance(n, ast.Return) for n in ast.walk(node)):
            groups.append(group + [s for s in steps[i + 1 :] if not isinstance(s[1], ast.With)])
            return groups
        last = next((e for s, e in regions if s <= node.lineno <= e), None)
        then = steps[i + 1][1] if i + 1 < len(steps) else None
        if last and then and then.lineno <= last:
            continue  # the region goes on
        if then and not isinstance(then, ast.With) and isinstance(node, ASSIGNS) and not last:
            continue
        groups.append(group)
        group = []
    return groups + ([group] if group else [])


ASSIGNS = (ast.Assign, ast.AugAssign, ast.AnnAssign)


def _function(lines, node):
    return _ranks(_text(lines, _start(node), node.end_lineno), "function")


def _ranks(code, role):
    return _cell(f"%%ranks\n{code}", role)


def _markdown(text):
    return nbformat.v4.new_markdown_cell(text)


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
        if b.metadata.get("course", {}).get("role") in ("run", "figures"):
            # The whole lesson again, after the walkthrough ran its code: shown (its stored
            # output is the docs'), not run by nbval, which tests/test_lessons.py does already.
            b.metadata["tags"] = ["nbval-skip"]
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
