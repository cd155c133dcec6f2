"""The docs site: builds with --strict (a missing snippet, page or link fails it), every lesson and
notebook has a page, no Python is pasted by hand, and every page renders in a real browser."""

import contextlib
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

from conftest import LESSONS, ROOT, lesson_ids

MKDOCS = ROOT / "mkdocs.yml"
SHOTS = ROOT / "out" / "screenshots"  # for a person to look at; not committed


def mkdocs_build(site, config_folder):
    """`mkdocs build --strict` of config_folder/mkdocs.yml into `site`, bounded."""
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)]
    return subprocess.run(build, cwd=config_folder, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("site")
    build = mkdocs_build(folder, ROOT)
    assert build.returncode == 0, build.stdout + build.stderr
    return folder


def test_site_builds_strict(site):
    assert (site / "index.html").is_file()


def test_a_missing_snippet_fails_the_build(tmp_path):
    """The strict build is what keeps docs from drifting: prove it fails when code goes missing."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text('```python\n--8<-- "lessons/00_hello.py:no-such-region"\n```\n')
    config = MKDOCS.read_text().split("\nnav:")[0].replace("docs_dir: docs", f"docs_dir: {docs}")
    config = re.sub(r"  - mkdocs-jupyter:\n(    .*\n)+", "", config)
    config = re.sub(r"^  - (tools/\S+)", rf"  - {ROOT}/\1", config, flags=re.M)  # the hooks
    (tmp_path / "mkdocs.yml").write_text(
        config.replace('base_path: ["."]', f'base_path: ["{ROOT}"]')
    )
    build = mkdocs_build(tmp_path / "site", tmp_path)
    assert build.returncode != 0 and "no-such-region" in build.stdout + build.stderr


@pytest.mark.parametrize("path", LESSONS, ids=lesson_ids())
def test_every_lesson_has_a_page_and_a_notebook_in_the_nav(path):
    nav = MKDOCS.read_text()
    assert (ROOT / "docs" / "lessons" / f"{path.stem}.md").is_file()
    assert f"lessons/{path.stem}.md" in nav and f"notebooks/{path.stem}.ipynb" in nav


def test_no_python_is_pasted_into_the_docs():
    """Every python code block is a snippet include from a named region of the source."""
    for page in (ROOT / "docs").rglob("*.md"):
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            lines = [line for line in block.strip().splitlines() if line.strip()]
            assert lines and all(line.startswith("--8<--") for line in lines), (
                f"{page.relative_to(ROOT)}: a python block that is not a snippet include:\n{block}"
            )


# A line that a program printed: a rank's, a launcher's, or the command line of a captured run.
OUTPUT_LINE = re.compile(r"\s*(\[rank|\[launcher\]|launcher:|\$ (torchrun|python) )")
FENCED = re.compile(r"^ *```[^\n]*\n(.*?)^ *```", re.S | re.M)


def pasted_outputs(page_text):
    """The fenced blocks of a page that hold program output and are not includes."""
    return [
        block
        for block in FENCED.findall(page_text)
        if any(OUTPUT_LINE.match(line) for line in block.splitlines())
        and not all(
            line.strip().startswith("--8<--") for line in block.splitlines() if line.strip()
        )
    ]


def test_no_program_output_is_pasted_into_the_docs():
    """Outputs live in docs/outputs/, written by a real run (tools/capture_debug_outputs.py), or in
    docs/outputs/gpu/ saying what produced them; a page includes them, never a hand copy."""
    pasted = "```text\n[rank 0] error: a student left\nlauncher: rank 2 failed first\n```\n"
    included = '```text\n--8<-- "docs/outputs/page_06_teacher_exits.txt"\n```\n'
    assert pasted_outputs(pasted) and not pasted_outputs(included)  # the check can fail
    problems = [
        f"{page.relative_to(ROOT)}: program output pasted by hand:\n{block}"
        for page in sorted((ROOT / "docs").rglob("*.md"))
        for block in pasted_outputs(page.read_text())
    ]
    assert not problems, "\n".join(problems)


def browser():
    """Headless Debian chromium through chromedriver; None if not installed (CI installs it)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("COURSE_REQUIRE_BROWSER"):
            pytest.fail("chromium/chromedriver are missing but COURSE_REQUIRE_BROWSER is set")
        pytest.skip(
            "chromium and chromedriver are not installed (apt install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


# Per page: the main article's text, images that failed to load, code blocks that came out empty.
INSPECT = """
const article = document.querySelector('article.md-content__inner');
const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0)
  .map(i => i.src);
const empty = [...document.querySelectorAll('pre code, .highlight pre')]
  .filter(c => c.textContent.trim() === '').length;
return {text: article ? article.innerText.trim().length : 0, broken: broken, empty: empty};
"""


def inspect(driver):
    """INSPECT's numbers once the article has text: headless chromium sometimes answers before
    it has laid the page out. A page whose article stays empty for 10 s is reported empty."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    seen = {}

    def laid_out(d):
        seen.update(d.execute_script(INSPECT))
        return seen["text"] > 0

    with contextlib.suppress(TimeoutException):
        WebDriverWait(driver, 10, poll_frequency=0.2).until(laid_out)
    return seen


def test_every_page_renders_in_a_browser(site):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver = browser()
    pages = sorted(
        p.relative_to(site).as_posix()
        for p in site.rglob("index.html")
        if "assets" not in p.parts and p.parent != site / "search"
    )
    problems = []
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        for page in pages:
            driver.get(f"http://127.0.0.1:{server.server_port}/{page}")
            seen = inspect(driver)
            if seen["text"] < 200:
                problems.append(f"{page}: main content missing ({seen['text']} characters)")
            if seen["broken"]:
                problems.append(f"{page}: broken images {seen['broken']}")
            if seen["empty"]:
                problems.append(f"{page}: {seen['empty']} empty code blocks")
            if page in ("index.html", "lessons/00_hello/index.html"):
                driver.save_screenshot(str(SHOTS / (page.replace("/", "_") + ".png")))
    finally:
        driver.quit()
        server.shutdown()
    assert len(pages) >= 3 and not problems, "\n".join(problems)
