"""Open a live-rank notebook in a real JupyterLab, in headless chromium, run its first cells
(the ranks start, the lesson's imports, its first steps on 4 ranks) and save a screenshot.

    python tools/jupyterlab_screenshot.py                      # notebook 00, 12 cells
    python tools/jupyterlab_screenshot.py 06 --cells 16 --out /tmp/06.png

Needs Debian's chromium and chromedriver (apt install chromium chromium-driver); JupyterLab
comes with the dev extra. The notebook is copied, outputs cleared, into a temporary folder
that JupyterLab serves, so the shipped one is never touched. Not run in CI.
"""

import argparse
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser(width, height):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def wait_for(what, seconds, every=0.25):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if found := what():
            return found
        time.sleep(every)
    raise TimeoutError(f"gave up after {seconds} s")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lesson", nargs="?", default="00")
    p.add_argument("--cells", type=int, default=12, help="cells to run from the top (12)")
    p.add_argument("--out", default=str(ROOT / "docs" / "figures" / "21_jupyterlab.png"))
    args = p.parse_args()
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    source = next((ROOT / "notebooks").glob(f"{args.lesson}_*.ipynb"))
    folder = Path(tempfile.mkdtemp(prefix="course-lab-"))
    nb = nbformat.read(source, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, folder / source.name)
    settings = folder / ".config/lab/user-settings/@jupyterlab/apputils-extension"
    settings.mkdir(parents=True)  # no "get notified about Jupyter news?" over the cells
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    port, token = free_port(), secrets.token_hex(16)
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
         f"--IdentityProvider.token={token}", "--allow-root", f"--ServerApp.root_dir={folder}",
         "--ServerApp.ip=127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder,
        env={**os.environ, "JUPYTER_CONFIG_DIR": str(folder / ".config")},
    )  # fmt: skip
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/lab/tree/{source.name}?token={token}"
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 60)
        driver = browser(1400, 1800)
        driver.get(url)

        def select_first_cell():  # JupyterLab redraws as it loads: retry until a click holds
            try:
                driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")[0].click()
                return True
            except (IndexError, WebDriverException):
                return False

        time.sleep(5)  # the kernel starts
        wait_for(select_first_cell, 90)
        ActionChains(driver).send_keys(Keys.ESCAPE).perform()  # command mode
        started = time.monotonic()
        for _ in range(args.cells):  # run it and select the next, as a learner would
            ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(
                Keys.SHIFT
            ).perform()
            time.sleep(0.5)
            wait_for(
                lambda: "[*]" not in driver.find_element(By.CSS_SELECTOR, ".jp-Notebook").text, 120
            )
        print(f"ran {args.cells} cells in {time.monotonic() - started:.1f} s")
        # Show the last code cell that printed, with what came before it.
        outputs = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")
        if outputs:
            driver.execute_script("arguments[0].scrollIntoView({block: 'end'});", outputs[-1])
        time.sleep(1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.out)
        print(f"saved {args.out}")
    finally:
        if driver:
            driver.quit()
        with contextlib.suppress(
            OSError
        ):  # the server shuts its kernel down, which stops its ranks
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/shutdown?token={token}", method="POST"
            )
            urllib.request.urlopen(request, timeout=30)
        try:
            lab.wait(90)
        except subprocess.TimeoutExpired:
            lab.kill()


if __name__ == "__main__":
    main()
