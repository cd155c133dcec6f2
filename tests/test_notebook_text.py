"""A lesson's docstring, as the first cell of its notebook (tools/make_notebooks.py): sentences
stay whole, lists stay lists, prose stays out of code blocks, and the menu item it names exists
in JupyterLab 4. No ranks are started here."""

import ast

from course.check import load

from conftest import ROOT

make_notebooks = load(ROOT / "tools" / "make_notebooks.py")  # a script, not a package

DOC = """Lesson 99 - a title that is long enough to go on
over two lines.

The idea
    One paragraph that a line break
    splits in the source.

    Steps:
    1. first, which goes on
       over a line;
    2. second.

Run it
    torchrun --nproc-per-node 4 lessons/99_x.py
    Two machines: on each, its own --node-rank:
    torchrun --nnodes 2 lessons/99_x.py

Security: a sentence whose lines hang indented, so it looks like a heading over a body,
    but it is prose.
A closing paragraph, cut
in two lines.
"""


def test_docstring_layout_becomes_markdown_that_reads_as_written():
    md = make_notebooks.docstring_to_markdown(DOC)
    assert md.startswith("# Lesson 99 - a title that is long enough to go on over two lines.\n")
    assert "One paragraph that a line break splits in the source." in md
    assert "Steps:\n\n1. first, which goes on over a line;\n2. second." in md  # a list, apart
    assert "# Two machines: on each, its own --node-rank:\n" in md  # a comment in the block
    assert "```\ntorchrun --nproc-per-node 4 lessons/99_x.py\n" in md
    assert "**Security" not in md and "hang indented, so it looks like a heading over a" in md
    assert "A closing paragraph, cut in two lines." in md


def test_every_lessons_first_cell_keeps_its_title_whole_and_names_a_real_menu_item():
    for path in sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
        md = make_notebooks.docstring_to_markdown(doc)
        title, after = md.split("\n\n")[:2]  # the title whole: what follows is a heading
        assert title.startswith("# Lesson") and after.startswith("**"), path.name
        cells = make_notebooks.build(path).cells
        assert "Kernel → Restart Kernel and Clear Outputs of All Cells" in cells[1].source
