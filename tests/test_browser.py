"""The course in a real browser: headless Chromium (Playwright) drives a JupyterLab on loopback.

What a learner does in a workshop: open 01, Run All, change the anchor sizes in the explorer and
see the figure and the coverage numbers change; the same for 03's IoU threshold. The Lab runs
with the project's settings (``.jupyter/``, what ``make lab`` uses), so the Jupyter news pop-up
must not appear. An executed notebook written by ``rpnlab run`` shows its widgets when reopened.

The notebooks are served from a copy (JupyterLab autosaves), switched to smoke size as CI runs
them. Screenshots are kept in ``runs/browser-test/`` (git-ignored) as test artifacts.

Needs Playwright's Python client and a Chromium binary: Debian's ``chromium`` package
(``apt-get install -y chromium``; ``.ci/run`` installs it) at ``/usr/bin/chromium`` or wherever
``$RPNLAB_CHROMIUM`` points. Playwright's own browser download is never used. Without them the
test is skipped, saying which is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JUPYTER = Path(sys.executable).with_name("jupyter")
CHROMIUM = Path(os.environ.get("RPNLAB_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "runs" / "browser-test"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
NEWS_QUESTION = "notified about official Jupyter news"


def _requirements() -> str:
    """Why the browser test cannot run here, or "" when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright's Python client is not installed (pip install playwright)"
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set RPNLAB_CHROMIUM)"
    return ""


pytestmark = [
    pytest.mark.skipif(bool(_requirements()), reason=_requirements() or "ready"),
    pytest.mark.slow,
    pytest.mark.xdist_group("notebooks"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _smoke_copy(name: str, folder: Path) -> Path:
    """A copy of ``notebooks/<name>.ipynb`` whose parameters cell says ``smoke = True``."""
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text(encoding="utf-8"))
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "".join(cell["source"])
    patched = re.sub(r"^smoke: bool = False", "smoke: bool = True", source, count=1, flags=re.MULTILINE)
    assert patched != source, f"{name}: no 'smoke: bool = False' line in its parameters cell"
    cell["source"] = patched
    path = folder / f"{name}.ipynb"
    path.write_text(json.dumps(nb), encoding="utf-8")
    return path


@contextlib.contextmanager
def lab_server(served: Path, tmp: Path, start_timeout_s: float = 90):
    """A JupyterLab on 127.0.0.1 serving ``served``, with the project's settings (``.jupyter/``) and
    nothing of whoever runs it (config, runtime and settings under ``tmp``); yields
    ``{"base": url, "served": served, "log": path, "pid": the server's process id}``. Also used by ``benchmarks/bench_browser.py``."""
    port = _free_port()
    env = dict(
        os.environ,
        JUPYTER_CONFIG_PATH=str(ROOT / ".jupyter"),  # what `make lab` adds
        JUPYTER_CONFIG_DIR=str(tmp / "config"),  # no personal config of whoever runs the test
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp / "user-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
        RPNLAB_RECORD_DIR=str(tmp / "records"),
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    env.pop("MPLBACKEND", None)  # the kernel picks the inline backend, as for a learner
    root_flag = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    log = (tmp / "lab.log").open("w")
    server = subprocess.Popen(
        [str(JUPYTER), "lab", "--no-browser", *root_flag, "--ip=127.0.0.1", f"--port={port}",
         "--IdentityProvider.token=", f"--ServerApp.root_dir={served}"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp / "lab.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"JupyterLab did not start within {start_timeout_s:.0f} s"
            time.sleep(0.5)
        yield {"base": base, "served": served, "log": tmp / "lab.log", "pid": server.pid}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab on 127.0.0.1 with the project's settings, serving smoke copies of 01 and 03."""
    tmp = tmp_path_factory.mktemp("lab")
    served = tmp / "notebooks"
    served.mkdir()
    for name in ("01_anchors", "03_matching_sampling"):
        _smoke_copy(name, served)
    with lab_server(served, tmp) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    assert path.stat().st_size > 0


def _open(browser, lab, notebook: str):
    """A page with ``notebook`` open and its kernel started (the project settings start it unasked)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(f"{lab['base']}/lab/tree/{notebook}?reset")
    page.locator(".jp-Notebook .jp-Cell").first.wait_for()
    assert page.get_by_text("Select Kernel").count() == 0, "JupyterLab asked for a kernel"
    _wait_for_settled_kernel(lab["base"], notebook)
    return page


def _wait_for_settled_kernel(base: str, notebook: str, timeout_s: float = 120) -> None:
    """Until the notebook's session keeps one idle kernel for 3 s (the Lab may swap the first one)."""
    deadline, seen, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base}/api/sessions", timeout=10) as response:
            sessions = [s for s in json.loads(response.read()) if s["path"].endswith(notebook)]
        state = [(s["kernel"]["id"], s["kernel"]["execution_state"]) for s in sessions]
        if state != seen:
            seen, since = state, time.monotonic()
        elif len(state) == 1 and state[0][1] == "idle" and time.monotonic() - since >= 3:
            return
        time.sleep(0.5)
    raise AssertionError(f"{notebook}: no settled kernel within {timeout_s:.0f} s: {seen}")


_PROMPTS = """() => Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))
                     .map(p => p.textContent.trim())"""


def _run_all(page, timeout_s: float = float(os.environ.get("RPNLAB_BROWSER_TIMEOUT", "240"))) -> float:
    """Run > Run All Cells and wait until every code cell has run; returns the seconds."""
    page.evaluate("""() => document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')
                           .forEach(p => p.textContent = '')""")  # stale prompts cannot look done
    start = time.monotonic()
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    done = re.compile(r"^\[\d+\]:$")
    prompts: list[str] = []
    while time.monotonic() - start < timeout_s:
        prompts = page.evaluate(_PROMPTS)
        if prompts and all(done.match(p) for p in prompts):
            break
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                              has_text="Traceback")
        assert errors.count() == 0, errors.first.inner_text()[-2000:]
        time.sleep(0.5)
    else:
        _shot(page, "run_all_timeout")
        raise AssertionError(f"Run All did not finish within {timeout_s:.0f} s; prompts: {prompts}")
    errors = page.locator(".jp-OutputArea-output", has_text="Traceback")
    assert errors.count() == 0, errors.first.inner_text()[-2000:]
    return time.monotonic() - start


def _figure_src(explorer) -> str:
    image = explorer.locator("img").first
    image.wait_for(timeout=15_000)
    return image.get_attribute("src") or ""


def _numbers(status) -> str:
    """The explorer's status line without its timing line (which changes on every update)."""
    return "\n".join(ln for ln in status.inner_text().splitlines() if not ln.startswith("update "))


def _wait_change(locator_text, before: str, what: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = locator_text()
        if now and now != before:
            return now
        time.sleep(0.2)
    raise AssertionError(f"{what} did not change within {timeout_s:.0f} s (still {before[:200]!r})")


def test_news_popup_is_off_in_the_project_settings(lab):
    url = f"{lab['base']}/lab/api/settings/@jupyterlab/apputils-extension:notification"
    with urllib.request.urlopen(url, timeout=10) as response:
        properties = json.loads(response.read())["schema"]["properties"]
    # overrides.json changes the defaults the Lab starts from (no user settings in this test).
    assert properties["fetchNews"]["default"] == "false", properties["fetchNews"]
    assert properties["checkForUpdates"]["default"] is False, properties["checkForUpdates"]


def test_01_anchor_sizes_change_the_figure_and_coverage(lab, browser):
    page = _open(browser, lab, "01_anchors.ipynb")
    seconds = _run_all(page)
    print(f"01 Run All in the browser (smoke size): {seconds:.1f} s")
    explorer = page.locator(".widget-vbox", has=page.locator(".widget-select-multiple")).first
    explorer.scroll_into_view_if_needed()
    status = explorer.locator(".widget-html-content", has_text="coverage of").first
    status.wait_for()
    _shot(page, "01_before")
    figure_before, status_before = _figure_src(explorer), _numbers(status)
    assert page.get_by_text(NEWS_QUESTION).count() == 0, "the Jupyter news pop-up is showing"

    sizes = explorer.locator(".widget-select-multiple", has=page.locator("label", has_text="sizes")).locator("select")
    chosen = sizes.evaluate("s => Array.from(s.selectedOptions).map(o => o.value)")
    all_options = sizes.evaluate("s => Array.from(s.options).map(o => o.value)")
    assert len(chosen) >= 2, chosen
    # Ctrl+click on the smallest selected size unselects it, as a learner would: the small boxes
    # lose their best anchors, so the coverage must drop.
    sizes.locator("option").nth(all_options.index(chosen[0])).click(modifiers=["Control"])

    status_after = _wait_change(lambda: _numbers(status), status_before, "the coverage numbers")
    figure_after = _wait_change(lambda: _figure_src(explorer), figure_before, "the figure")
    _shot(page, "01_after")
    numbers = re.compile(r"mean best IoU ([0-9.]+)")
    assert numbers.search(status_before) and numbers.search(status_after), status_after
    assert float(numbers.search(status_after).group(1)) < float(numbers.search(status_before).group(1)), (
        status_before, status_after)
    k = re.compile(r"k = (\d+) anchors per location")
    assert int(k.search(status_after).group(1)) < int(k.search(status_before).group(1)), status_after
    assert figure_after.startswith(("data:image/png", "blob:")), figure_after[:40]
    assert len(all_options) > len(chosen)
    page.close()


def test_03_threshold_changes_the_figure_and_counts(lab, browser):
    page = _open(browser, lab, "03_matching_sampling.ipynb")
    seconds = _run_all(page)
    print(f"03 Run All in the browser (smoke size): {seconds:.1f} s")
    explorer = page.locator(".widget-vbox", has=page.locator(".widget-hslider", has_text="high IoU")).first
    explorer.scroll_into_view_if_needed()
    status = explorer.locator(".widget-html-content", has_text="positive").first
    status.wait_for()
    _shot(page, "03_before")
    figure_before, status_before = _figure_src(explorer), _numbers(status)

    readout = explorer.locator(".widget-hslider", has_text="high IoU").locator(".widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("0.4")
    page.keyboard.press("Enter")

    status_after = _wait_change(lambda: _numbers(status), status_before, "the label counts")
    _wait_change(lambda: _figure_src(explorer), figure_before, "the figure")
    _shot(page, "03_after")
    positives = re.compile(r"(\d+) positive")
    assert int(positives.search(status_after).group(1)) > int(positives.search(status_before).group(1)), (
        status_before, status_after)
    page.close()


def test_executed_notebook_shows_its_widgets_when_reopened(lab, browser):
    from rpnlab.lab.runner import execute_one

    executed = lab["served"] / "01_executed.ipynb"
    row = execute_one(lab["served"] / "01_anchors.ipynb", executed, smoke=True)
    assert row["status"] == "ok", row
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(f"{lab['base']}/lab/tree/{executed.name}?reset")
    page.locator(".jp-Notebook .jp-Cell").first.wait_for()
    _wait_for_settled_kernel(lab["base"], executed.name)
    explorer_cell = page.locator(".jp-CodeCell", has_text="explorer = widgets.anchor_explorer").first
    explorer_cell.wait_for(state="attached")
    # Offscreen cells are skipped by the browser (content-visibility): bring it into view first.
    deadline = time.monotonic() + 30
    widget = explorer_cell.locator(".widget-select-multiple").first
    while time.monotonic() < deadline and widget.count() == 0:
        explorer_cell.evaluate("el => el.scrollIntoView()")
        time.sleep(1)
    explorer_cell.evaluate("el => el.scrollIntoView()")
    time.sleep(1)
    _shot(page, "01_reopened")
    text = explorer_cell.evaluate("el => el.textContent")
    assert "Error displaying widget" not in text, text[-500:]
    assert widget.count() == 1, text[-500:]
    assert explorer_cell.locator(".widget-vbox img").count() >= 1
    page.close()

