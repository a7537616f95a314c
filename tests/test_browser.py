"""What a learner sees: notebooks run in JupyterLab inside a real (headless) Chromium.

papermill and nbval check the kernel's side of a notebook. These tests check the page: they
start JupyterLab on a loopback port with a one-off token, open a copy of a notebook in Debian's
Chromium driven by Playwright, press "Run All", and then look at what rendered:

- no error output anywhere on the page (cells, and callbacks inside widgets);
- the explorer widget is there, with its sliders and its figure;
- moving a slider with the keyboard redraws the figure (the PNG's bytes change);
- the page shows as many figures as the committed notebook has, plus one per explorer.

Chromium is `/usr/bin/chromium` (or $TACQ_LITE_CHROMIUM). Where it is missing the tests try
`apt-get install -y chromium` and skip, saying why, only when that fails; with
TACQ_LITE_REQUIRE_BROWSER=1 (set by CI) they fail instead. On a failure a screenshot, the
page's HTML and JupyterLab's log go to test-artifacts/browser/ (or $TACQ_LITE_ARTIFACTS).
JupyterLab and Chromium are started as child processes and stopped by their process ids.
"""
from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = Path(os.environ.get("TACQ_LITE_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
]
RUN_TIMEOUT_S = 20 * 60  # one notebook's "Run All" on a busy 2-core machine


# ----------------------------------------------------------------------------- processes

def _descendants(pid: int) -> list[int]:
    """Process ids of every descendant of `pid` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _stop(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM `proc`, wait, then SIGKILL it and every descendant it had, all by process id."""
    pids = _descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 10
    while (alive := [p for p in [proc.pid, *pids] if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"processes {alive} outlived the stop of {proc.args[0]}"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's bookkeeping is left


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


# ----------------------------------------------------------------------------- Chromium

def _chromium_or_skip() -> str:
    """The Chromium executable; installed with apt-get when missing and possible."""
    exe = os.environ.get("TACQ_LITE_CHROMIUM", "/usr/bin/chromium")
    if Path(exe).exists():
        return exe
    why = f"Chromium is not at {exe}"
    cmd = ["apt-get", "install", "-y", "-q", "chromium"]
    if shutil.which("apt-get") is None:
        why += " and apt-get is not available"
    elif os.geteuid() != 0 and shutil.which("sudo") is None:
        why += " and apt-get needs root (no sudo)"
    else:
        if os.geteuid() != 0:
            cmd = ["sudo", "-n", *cmd]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if not Path(exe).exists():  # a stale package index: refresh it once and retry
            subprocess.run([*cmd[:-4], "update", "-q"], env=env, capture_output=True, timeout=600)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if Path(exe).exists():
            return exe
        why += f"; `{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()[-300:]}"
    message = (f"{why}. Install Debian's chromium (`apt-get install -y chromium`) or point "
               "TACQ_LITE_CHROMIUM at a Chromium binary to run the browser tests.")
    if os.environ.get("TACQ_LITE_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium started by us (so we hold its pid), driven by Playwright over CDP."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra has it)")
    exe = _chromium_or_skip()
    profile = tmp_path_factory.mktemp("chromium-profile")
    log = profile.parent / "chromium.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    pw = None
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Chromium did not start (exit {proc.poll()}):\n{_tail(log)}")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        pw = sync_api.sync_playwright().start()
        yield pw.chromium.connect_over_cdp(f"http://127.0.0.1:{port}")
    finally:
        if pw is not None:
            pw.stop()
        _stop(proc, grace_s=10)


# ----------------------------------------------------------------------------- JupyterLab

@dataclass
class Lab:
    url: str
    token: str
    root: Path
    log: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 with a random token, serving a scratch folder (never notebooks/)."""
    pytest.importorskip("jupyterlab")
    base = tmp_path_factory.mktemp("lab")
    root, settings = base / "root", base / "settings"
    root.mkdir()
    # Every cell stays in the page (no virtual scrolling), so the page can be counted; no news pop-up.
    for plugin, value in {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                           "checkForUpdates": False},
    }.items():
        (settings / plugin).parent.mkdir(parents=True, exist_ok=True)
        (settings / plugin).write_text(json.dumps(value))
    token, port = secrets.token_hex(16), _free_port()
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"), "JUPYTER_RUNTIME_DIR": str(base / "runtime")}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--expose-app-in-browser", "--LabApp.extension_manager=readonly"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = base / "jupyterlab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                req = urllib.request.Request(f"{url}/api/status", headers={"Authorization": f"token {token}"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start (exit {proc.poll()}):\n{_tail(log)}")
            time.sleep(0.5)
        yield Lab(url, token, root, log)
    finally:
        _stop(proc, grace_s=30)


# ----------------------------------------------------------------------------- notebooks

def _image_outputs(cells) -> int:
    return sum("image/png" in o.get("data", {}) for c in cells if c.cell_type == "code" for o in c.get("outputs", []))


def stage(lab: Lab, name: str, *, cells: slice = slice(None), edit=None, parameters: dict | None = None,
          as_name: str | None = None):
    """Copy a committed notebook into the lab's folder, outputs stripped, and say what it should show.

    cells: keep only these cells; edit(source_list) may change sources (the broken-widget tests);
    parameters: injected by papermill (its "injected-parameters" cell), as a sweep would;
    as_name: the copy's file name (default: `name`).
    Returns (file name, figures the committed notebook shows for the kept cells).
    """
    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb = copy.deepcopy(committed)
    nb.cells = nb.cells[cells]
    expected = _image_outputs(committed.cells[cells])
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    if edit is not None:
        edit(nb.cells)
    out = lab.root / (as_name or name)
    nbformat.write(nb, out)
    if parameters:
        import papermill

        papermill.execute_notebook(str(out), str(out), parameters=parameters, prepare_only=True,
                                   kernel_name="python3", progress_bar=False)
    return out.name, expected


_STATE_JS = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const cells = panel.content.widgets.filter(c => c.model.type === 'code');
  const prompts = [...panel.content.node.querySelectorAll('.jp-InputPrompt')].map(n => n.textContent);
  const errors = [];
  cells.forEach((c, i) => c.model.outputs.toJSON().forEach(o => {
    if (o.output_type === 'error') errors.push(`code cell ${i}: ${o.ename}: ${o.evalue}`);
  }));
  return {
    status: panel.sessionContext.session && panel.sessionContext.session.kernel
            ? panel.sessionContext.session.kernel.status : 'none',
    pending: prompts.filter(t => t.includes('*')).length,
    done: cells.filter(c => c.model.executionCount !== null).length,
    total: cells.length, errors,
  };
}"""

# Errors a learner would see that live outside the cells' own outputs: tracebacks printed by a
# widget callback into its Output area, and the widget manager's own failure messages.
_PAGE_ERRORS_JS = """(panelId) => {
  const found = [];
  document.getElementById(panelId).querySelectorAll('.jp-OutputArea-output').forEach(n => {
    const mime = n.getAttribute('data-mime-type') || '';
    const text = n.textContent || '';
    if (mime.includes('error') || /Traceback \\(most recent call last\\)|Error: /.test(text) && mime.includes('stderr'))
      found.push(text.slice(0, 300));
    if (/Error displaying widget|Failed to (load|create) (model|view)|Error creating widget/.test(text))
      found.push(text.slice(0, 300));
  });
  return found;
}"""


@dataclass
class Observed:
    """What the page showed after Run All and one keyboard move of a slider."""

    errors: list
    sliders: list
    widget_figure_changed: bool
    figures_outside_widgets: int
    figures_in_widgets: int
    explorers: int


def run_all(page, lab: Lab, file: str) -> str:
    """Open `file` alone (`reset`: no tabs restored from earlier pages), Run All, wait; return its panel's id."""
    page.goto(f"{lab.url}/lab/tree/{file}?reset&token={lab.token}")
    page.wait_for_function(
        "(f) => window.jupyterapp && window.jupyterapp.shell.currentWidget"
        " && window.jupyterapp.shell.currentWidget.context"
        " && window.jupyterapp.shell.currentWidget.context.path === f", arg=file, timeout=120_000)
    page.evaluate("async () => { await window.jupyterapp.shell.currentWidget.sessionContext.ready; }")
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    deadline, quiet = time.monotonic() + RUN_TIMEOUT_S, 0
    while time.monotonic() < deadline:
        time.sleep(1)
        s = page.evaluate(_STATE_JS)
        finished = s["status"] == "idle" and s["pending"] == 0 and (s["done"] == s["total"] or s["errors"])
        quiet = quiet + 1 if finished else 0
        if quiet >= 3:  # idle for 3 polls in a row: "Run All" has finished (or stopped at an error)
            return page.evaluate("() => window.jupyterapp.shell.currentWidget.id")
    raise AssertionError(f"Run All did not finish in {RUN_TIMEOUT_S} s: {s}")


def observe(page, panel_id: str, *, slider: str) -> Observed:
    """Read the notebook's panel, then move the explorer's `slider` one step right with the keyboard."""
    panel = page.locator(f'[id="{panel_id}"]')  # this notebook only, whatever else the page holds
    errors = [*page.evaluate(_STATE_JS)["errors"], *page.evaluate(_PAGE_ERRORS_JS, panel_id)]
    explorer = panel.locator(".jp-Notebook .widget-interact")
    n_explorers = explorer.count()
    sliders, changed = [], False
    if n_explorers:
        box = explorer.first
        sliders = [t.strip() for t in box.locator(".widget-slider .widget-label").all_inner_texts()]
        figure = box.locator("img")
        if figure.count() == 1 and slider in sliders:
            before = figure.get_attribute("src")
            handle = box.locator(".widget-slider").filter(has_text=slider).locator(".noUi-handle")
            handle.focus()
            handle.press("ArrowRight")
            # Wait for the new PNG, or for the kernel to have been idle for 3 s with none (a redraw
            # that failed or drew the same picture), at most 90 s.
            deadline, idle = time.monotonic() + 90, 0
            while time.monotonic() < deadline and not changed and idle < 6:
                time.sleep(0.5)
                now = box.locator("img")
                changed = now.count() == 1 and now.get_attribute("src") not in (None, before)
                idle = idle + 1 if page.evaluate(_STATE_JS)["status"] == "idle" else 0
            errors += page.evaluate(_PAGE_ERRORS_JS, panel_id)  # a callback that fails on the new value
    all_figures = panel.locator(".jp-Notebook .jp-OutputArea-output img").count()
    in_widgets = panel.locator(".jp-Notebook .widget-interact img").count()
    return Observed(sorted(set(errors)), sliders, changed, all_figures - in_widgets, in_widgets, n_explorers)


def problems(seen: Observed, *, expected_figures: int, sliders: list[str]) -> list[str]:
    """Everything a learner would notice as broken; empty when the notebook is fine."""
    out = [f"error shown on the page: {e}" for e in seen.errors]
    if seen.explorers != 1:
        out.append(f"expected one explorer widget, the page has {seen.explorers}")
    if seen.sliders[: len(sliders)] != sliders:
        out.append(f"explorer sliders {seen.sliders}, expected {sliders}")
    if not seen.widget_figure_changed:
        out.append("moving the slider did not redraw the explorer's figure")
    if seen.figures_outside_widgets != expected_figures:
        out.append(f"{seen.figures_outside_widgets} figures outside the widget, the committed notebook has "
                   f"{expected_figures}")
    if seen.figures_in_widgets != seen.explorers:
        out.append(f"{seen.figures_in_widgets} figures inside {seen.explorers} explorer(s)")
    return out


def _api(lab: Lab, path: str, method: str = "GET"):
    req = urllib.request.Request(f"{lab.url}{path}", method=method, headers={"Authorization": f"token {lab.token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
    return json.loads(body) if body else None


def shutdown_kernels(lab: Lab) -> None:
    """End every kernel session (closing a tab leaves its kernel running, holding the model in memory)."""
    for session in _api(lab, "/api/sessions"):
        _api(lab, f"/api/sessions/{session['id']}", method="DELETE")
    deadline = time.monotonic() + 30
    while (left := _api(lab, "/api/kernels")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"kernels {[k['id'] for k in left]} survived their sessions' shutdown"


def check_in_browser(browser, lab: Lab, file: str, *, slider: str, sliders: list[str], expected_figures: int,
                     request) -> tuple[Observed, list[str]]:
    """Run `file` in a fresh page, observe it and list its problems: (what was seen, problems).

    While the page is still open, an exception or any problem keeps a screenshot, the page's HTML
    and the server log under ARTIFACTS/<test name>, so they show the failing page itself.
    """
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    try:
        seen = observe(page, run_all(page, lab, file), slider=slider)
        print(f"{file}: {seen}")  # shown by pytest on failure (and with -s)
        found = problems(seen, expected_figures=expected_figures, sliders=sliders)
        if found:
            found.append(f"(artifacts in {keep_artifacts(page, lab, request.node.name)})")
        return seen, found
    except Exception:
        keep_artifacts(page, lab, request.node.name)
        raise
    finally:
        context.close()
        shutdown_kernels(lab)


def keep_artifacts(page, lab: Lab, test_name: str) -> Path:
    where = ARTIFACTS / test_name
    where.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(where / "page.png"), full_page=True)
    (where / "page.html").write_text(page.content())
    shutil.copyfile(lab.log, where / "jupyterlab.log")
    return where


def assert_fine(page_problems: list[str]) -> None:
    if page_problems:
        pytest.fail("\n".join(page_problems))


# ----------------------------------------------------------------------------- tests

def test_01_runs_in_jupyterlab_and_its_slider_redraws(browser, lab, request):
    """Notebook 01 with its default parameters, exactly as a learner opens it."""
    file, expected = stage(lab, "01_uniform_quantization.ipynb")
    _, found = check_in_browser(browser, lab, file, slider="bits", sliders=["bits", "groupsize"],
                                expected_figures=expected, request=request)
    assert_fine(found)


def test_04_budget_explorer_redraws(browser, lab, request):
    """Notebook 04's selector/budget explorer, with the small calibration used by the papermill test."""
    file, expected = stage(lab, "04_outlier_masking.ipynb", parameters=dict(
        settings=[[3, -1]], ratios=[0.0035], selectors=["tacq", "magnitude", "random"],
        n_calib=2, seq_len=64, eval_tokens=2048))  # 16 windows: the notebook asserts intervals apart
    _, found = check_in_browser(browser, lab, file, slider="ratio", sliders=["selector", "ratio"],
                                expected_figures=expected, request=request)
    assert_fine(found)


# The tests of the tests: notebook 01 up to and including its explorer, with the explorer broken
# on purpose. The checks above must notice, or they would also pass on a broken notebook.

def _explorer_cells() -> slice:
    nb = nbformat.read(NOTEBOOKS / "01_uniform_quantization.ipynb", as_version=4)
    last = max(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "explore(" in c.source)
    return slice(0, last + 1)


def _break(old: str, new: str):
    def edit(cells):
        hits = [c for c in cells if c.cell_type == "code" and old in c.source]
        assert len(hits) == 1, f"the explorer cell no longer contains {old!r}: update this test"
        hits[0].source = hits[0].source.replace(old, new)
    return edit


@pytest.mark.parametrize("broken, complaint", [
    # the slider moves but the callback ignores it: the figure never changes
    (("plot_rtn(W, bits=bits, groupsize=groupsize)", "plot_rtn(W, bits=3, groupsize=-1)"),
     "did not redraw"),
    # the callback raises for any width but 3: a traceback inside the widget
    (("plot_rtn(W, bits=bits, groupsize=groupsize)",
      "plot_rtn(W, bits=bits, groupsize=groupsize) if bits == 3 else 1 / 0"),
     "ZeroDivisionError"),
], ids=["ignores-slider", "raises"])
def test_a_broken_explorer_is_caught(browser, lab, request, broken, complaint, tmp_path, monkeypatch):
    file, expected = stage(lab, "01_uniform_quantization.ipynb", cells=_explorer_cells(), edit=_break(*broken),
                           as_name=f"broken_{request.node.callspec.id}.ipynb")
    monkeypatch.setattr(sys.modules[__name__], "ARTIFACTS", tmp_path)
    seen, found = check_in_browser(browser, lab, file, slider="bits", sliders=["bits", "groupsize"],
                                   expected_figures=expected, request=request)
    assert any(complaint in p for p in found), f"the broken explorer went unnoticed: {found} ({seen})"
    # ... and only the breakage is reported: the rest of the page (sliders, static figures) is fine.
    assert seen.explorers == 1 and seen.sliders == ["bits", "groupsize"], seen
    assert seen.figures_outside_widgets == expected, seen
    # The failure path kept what is needed to see why, from the failing page itself: a screenshot,
    # the page's HTML, the server log; and the failure names the complaint and where they are.
    with pytest.raises(pytest.fail.Exception, match=complaint):
        assert_fine(found)
    kept = tmp_path / request.node.name
    assert f"(artifacts in {kept})" in found
    assert file in (kept / "page.html").read_text()  # the page that failed, not another one
    assert {p.name for p in kept.iterdir()} == {"page.png", "page.html", "jupyterlab.log"}
    assert (kept / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_chromium_the_reason_is_given(monkeypatch, tmp_path):
    """No browser and no way to install one: a skip that says what to do, or a failure in CI."""
    monkeypatch.setenv("TACQ_LITE_CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("TACQ_LITE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"apt-get is not available.*apt-get install -y chromium"):
        _chromium_or_skip()
    monkeypatch.setenv("TACQ_LITE_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="TACQ_LITE_CHROMIUM"):
        _chromium_or_skip()
