"""Real-browser tests: the reader web app and JupyterLab's widgets, driven in headless Chromium.

Chromium and its driver come from the Debian packages ``chromium`` and ``chromium-driver``
(``.ci/run`` installs them); Selenium is given both paths, so nothing is downloaded at run time.
Without them every test here is skipped with the reason in pytest's summary (and a warning).
Set ``CXR_SCREENSHOT_DIR`` to keep the reader app's screenshots (the docs' figure comes from it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

from cxrlib import reader_study as rs
from cxrlib import reader_web as rw

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path(os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CXR_CHROMEDRIVER", "/usr/bin/chromedriver"))
WAIT_S = 90


def _missing_browser() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.is_file():
            return f"{path} not found (Debian package {package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the Python package selenium is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def chrome(tmp_path_factory):
    """A factory of headless Chromium drivers (each quit at the end of the module)."""
    reason = _missing_browser()
    if reason:
        message = (
            f"BROWSER TESTS SKIPPED: {reason}. Install with: apt-get update && "
            "apt-get install -y chromium chromium-driver"
        )
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def start(width: int = 1000, height: int = 1000):
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--window-size={width},{height}",
            f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        ):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        if driver.service.is_connectable():  # not quit by the test already
            driver.quit()


def _console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _wait(driver, condition, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition)
    except TimeoutException:
        raise AssertionError(
            f"timed out waiting for {what}; console: {_console_errors(driver)}"
        ) from None


def _keep_screenshot(path: Path) -> None:
    if os.environ.get("CXR_SCREENSHOT_DIR"):
        target = Path(os.environ["CXR_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / path.name)


# ----------------------------------------------------------------------------- (a) the reader app


def test_reader_app_session_with_reload_and_restart_in_chromium(chrome, tmp_path):
    from selenium.webdriver.common.by import By
    from test_reader_web import make_tiny_run

    study_dir = rw.prepare_from_run(make_tiny_run(tmp_path / "run"), tmp_path / "study")
    server, _, url = rw.start_server(study_dir, port=0, quiet=True)
    port = server.server_address[1]
    answers_file = study_dir / rw.ANSWERS_DIR / "ann__demo.csv"
    driver = chrome(900, 1000)
    try:

        def at(state: str) -> None:
            _wait(
                driver,
                lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == state,
                f"page state {state}",
            )

        driver.get(url)
        at("login")
        driver.find_element(By.ID, "reader").send_keys("ann")
        driver.find_element(By.ID, "start").click()
        truth = rw.ReaderStudy(study_dir).reader_sequence("ann").set_index("trial")["truth"]
        for trial in range(1, 6):  # right on the first five images
            at(f"trial-{trial}")
            assert len(rs.read_answers(answers_file)) == trial - 1  # every earlier click is on disk
            assert (
                driver.execute_script("return document.getElementById('image').naturalWidth") == 256
            )
            if trial == 3:
                driver.find_element(By.TAG_NAME, "body").send_keys(
                    truth[trial][0]
                )  # the r / s keys
            else:
                driver.find_element(By.ID, truth[trial]).click()
        at("trial-6")
        assert (
            "#reader=ann&key=" in driver.current_url
        )  # the page's own address resumes the session

        driver.refresh()  # a reload in the middle
        at("trial-6")
        assert "image 6 of 10 (resumed session)" in driver.find_element(By.ID, "progress").text
        server.shutdown()
        server.server_close()
        server, _, _ = rw.start_server(study_dir, port=port, quiet=True)  # a server restart
        driver.refresh()
        at("trial-6")
        trial_png = tmp_path / "reader_web_trial.png"
        driver.save_screenshot(str(trial_png))
        for trial in range(6, 11):  # then calls everything synthetic
            at(f"trial-{trial}")
            driver.find_element(By.ID, "synthetic").click()
        at("done")

        answers = rs.read_answers(answers_file)
        assert answers["trial"].tolist() == list(range(1, 11)) and set(answers["reader"]) == {"ann"}
        expected = rw.reader_scores(answers)
        shown = [
            [cell.text for cell in row.find_elements(By.CSS_SELECTOR, "td")]
            for row in driver.find_elements(By.CSS_SELECTOR, "#scores tr")[1:]
        ]
        assert [row[0] for row in shown] == [row["measure"] for row in expected]
        assert [row[1] for row in shown] == [f"{row['value']:.2f}" for row in expected]
        later_real = int((truth.loc[6:] == "real").sum())
        assert (
            shown[0][1] == f"{(10 - later_real) / 10:.2f}"
        )  # accuracy: 5 right, then the synthetic ones
        scores_png = tmp_path / "reader_web_scores.png"
        driver.save_screenshot(str(scores_png))
        for path in (trial_png, scores_png):
            assert path.read_bytes()[:4] == b"\x89PNG"
            _keep_screenshot(path)
        assert _console_errors(driver) == []
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- (b) JupyterLab


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def jupyterlab(tmp_path, monkeypatch):
    """Notebook 01 executed with the quick profile (and trusted), a notebook holding notebook 01's
    explorer cell on a small phantom cohort, not yet run, and JupyterLab serving them:
    ``(base url, token)``."""
    import re as regex

    import nbformat
    from nbclient import NotebookClient
    from nbformat.sign import NotebookNotary

    from cxrlib import config
    from cxrlib.data.phantom import CohortConfig, write_cohort

    write_cohort(tmp_path / "cohort", CohortConfig(n_patients=6, size=64, seed=0), progress=False)
    sources = [
        "from cxrlib.data import manifest as mf\nfrom cxrlib.viz import widgets\n\n"
        'manifest = mf.read_manifest("cohort/manifest.csv")',
        "widgets.manifest_browser(manifest)",
    ]  # notebook 01's explorer cell
    metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    nbformat.write(
        nbformat.v4.new_notebook(
            cells=[nbformat.v4.new_code_cell(s) for s in sources], metadata=metadata
        ),
        tmp_path / "live.ipynb",
    )
    # notebook 01 itself, run as a reader would after choosing the quick profile in its parameters cell
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "data"))
    executed = nbformat.read(config.notebooks_dir() / "01_data_assembly.ipynb", as_version=4)
    cell = next(c for c in executed.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    cell.source = regex.sub(r'^PROFILE = "default"', 'PROFILE = "quick"', cell.source, flags=regex.M)
    cell.source = regex.sub(r'^RUN_DIR = ""', f"RUN_DIR = {str(tmp_path / 'run')!r}", cell.source, flags=regex.M)
    assert 'PROFILE = "quick"' in cell.source
    NotebookClient(
        executed,
        timeout=300,
        kernel_name="python3",
        store_widget_state=True,
        resources={"metadata": {"path": str(config.notebooks_dir())}},
    ).execute()
    assert "application/vnd.jupyter.widget-state+json" in executed.metadata["widgets"]
    jupyter_dirs = {
        name: tmp_path / "jupyter" / name
        for name in ("data", "config", "runtime", "settings", "workspaces")
    }
    for folder in jupyter_dirs.values():
        folder.mkdir(parents=True)
    # trusted as 'jupyter trust' would make it: JupyterLab renders widget outputs of trusted notebooks only
    NotebookNotary(data_dir=str(jupyter_dirs["data"])).sign(executed)
    nbformat.write(executed, tmp_path / "executed.ipynb")
    news = (
        jupyter_dirs["settings"]
        / "@jupyterlab"
        / "apputils-extension"
        / "notification.jupyterlab-settings"
    )
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))

    port, token = _free_port(), "t" + os.urandom(12).hex()
    env = {
        **os.environ,
        "JUPYTER_DATA_DIR": str(jupyter_dirs["data"]),
        "JUPYTER_CONFIG_DIR": str(jupyter_dirs["config"]),
        "JUPYTER_RUNTIME_DIR": str(jupyter_dirs["runtime"]),
    }
    log = (tmp_path / "jupyterlab.log").open("w")
    lab = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--ServerApp.token={token}",
            f"--ServerApp.root_dir={tmp_path}",
            f"--LabApp.user_settings_dir={jupyter_dirs['settings']}",
            f"--LabApp.workspaces_dir={jupyter_dirs['workspaces']}",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.news_url=None",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).close()
                break
            except OSError:
                if lab.poll() is not None or time.monotonic() > deadline:
                    tail = (tmp_path / "jupyterlab.log").read_text()[-2000:]
                    raise AssertionError(f"JupyterLab did not start: {tail}") from None
                time.sleep(0.2)
        yield base, token
    finally:
        lab.terminate()
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.kill()
        log.close()


def test_jupyterlab_renders_an_executed_notebook_and_runs_the_explorer_live(chrome, jupyterlab):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    base, token = jupyterlab
    outputs = ".jp-Notebook .jp-OutputArea-output"

    # notebook 01 executed with the quick profile: its outputs and the explorer's saved widget state
    # render, no error anywhere
    driver = chrome(1200, 1000)
    driver.get(f"{base}/lab/tree/executed.ipynb?reset&token={token}")
    _wait(
        driver,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, f"{outputs} .widget-dropdown select")) == 3,
        "the explorer's dropdowns restored from the saved widget state",
    )
    _wait(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, f"{outputs} img"),
        "the explorer's saved image",
    )
    text = driver.find_element(By.CSS_SELECTOR, ".jp-Notebook").text
    assert "Error displaying widget" not in text and "Traceback" not in text
    assert _console_errors(driver) == []
    driver.quit()

    # the same cells run live: change the label filter and the image changes
    driver = chrome(1200, 1000)
    driver.get(f"{base}/lab/tree/live.ipynb?reset&token={token}")
    _wait(
        driver,
        lambda d: "Idle" in d.find_element(By.ID, "jp-main-statusbar").text,
        "an idle kernel",
    )
    driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")[0].find_element(
        By.CSS_SELECTOR, ".cm-content"
    ).click()
    for _ in range(2):
        ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()

    def picture(d):
        images = d.find_elements(
            By.CSS_SELECTOR,
            f"{outputs} .widget-output img, {outputs} .jupyter-widgets-output-area img",
        )
        return images[0].get_attribute("src") if images else None

    before = _wait(driver, picture, "the live explorer's image")
    label = Select(
        _wait(
            driver,
            lambda d: d.find_elements(By.CSS_SELECTOR, f"{outputs} .widget-dropdown select"),
            "the live explorer's dropdowns",
        )[0]
    )
    assert label.first_selected_option.text == "(all)"
    label.select_by_visible_text("normal")
    _wait(
        driver,
        lambda d: picture(d) not in (None, before),
        "a new image after changing the label filter",
    )
    _wait(
        driver,
        lambda d: re.search(
            r"label\s+normal", d.find_element(By.CSS_SELECTOR, ".jp-Notebook").text
        ),
        "the row of a normal image under it",
    )
    assert "Traceback" not in driver.find_element(By.CSS_SELECTOR, ".jp-Notebook").text
    assert _console_errors(driver) == []
