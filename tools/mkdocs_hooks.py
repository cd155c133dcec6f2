"""mkdocs hook: a page line `<!-- what you should see: lessons/NN_topic.py -->` becomes that
lesson's "What you should see" block, taken from its docstring, the one copy of its expected
output (tests/test_lessons.py holds the same block against a real run)."""

import re
from pathlib import Path

from course.launcher import what_you_should_see

MARKER = re.compile(r"^<!-- what you should see: (\S+) -->$", re.M)


def on_page_markdown(markdown, page, config, files):
    root = Path(config["config_file_path"]).parent

    def block(match):
        lines = what_you_should_see(root / match[1])
        return "```text\n" + "\n".join(lines) + "\n```"

    return MARKER.sub(block, markdown)
