"""mkdocs hook, two markers, each standing for the one copy of a fact kept elsewhere:
- a page line `<!-- what you should see: lessons/NN_topic.py -->` becomes that lesson's "What you
  should see" block, taken from its docstring, its expected output (tests/test_lessons.py holds
  the same block against a real run);
- `<!-- the lessons table: README.md -->` becomes README's table of lessons, each row linking to
  the lesson's page instead of its file."""

import re
from pathlib import Path

from course.launcher import what_you_should_see

MARKER = re.compile(r"^<!-- what you should see: (\S+) -->$", re.M)
LESSONS_TABLE = "<!-- the lessons table: README.md -->"
REGION = re.compile(
    r"<!-- --8<-- \[start:lessons\] -->\n(.*?)\n<!-- --8<-- \[end:lessons\] -->", re.S
)


def on_page_markdown(markdown, page, config, files):
    root = Path(config["config_file_path"]).parent

    def block(match):
        lines = what_you_should_see(root / match[1])
        return "```text\n" + "\n".join(lines) + "\n```"

    if LESSONS_TABLE in markdown:
        table = REGION.search((root / "README.md").read_text())[1]
        table = re.sub(r"\]\(lessons/(\w+)\.py\)", r"](lessons/\1.md)", table)
        markdown = markdown.replace(LESSONS_TABLE, table)
    return MARKER.sub(block, markdown)
