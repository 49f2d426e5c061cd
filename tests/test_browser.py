"""The real thing: a plain `streamlit run app.py`, driven by headless Chromium through
Selenium. Launch the demo from the Launch page, wait for it, open Explore through the link the
finished job shows, and check that the three charts are drawn with data. A screenshot is saved
in tmp_path and copied to /tmp/stride_screenshot.png. Then hostile text: a shared link whose
?run= is Markdown and HTML, on a run whose pool ids and texts are too, renders no link, image
or script; and every request the browser made went to the server on 127.0.0.1, which listens
on loopback only (from .streamlit/config.toml: no address is passed).

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: apt-get install chromium
chromium-driver; .ci/run installs them). The test fails rather than skips without them, unless
STRIDE_VIZ_SKIP_BROWSER=1 is set. The demo is shrunk with the STRIDE_VIZ_DEMO_* variables of
dashboard_run.TINY_DEMO_ENV so the whole test takes about a minute.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from dashboard_run import HOSTILE, TINY_DEMO_ENV, hostile_copy, wait_job
from stride_viz.jobs import JobStore, LocalProcessExecutor

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if os.environ.get("STRIDE_VIZ_SKIP_BROWSER") == "1":
    pytest.skip("STRIDE_VIZ_SKIP_BROWSER=1", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout: float, what: str, poll: float = 0.5):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_jobs(home: Path) -> None:
    """Cancel the active jobs of the data directory ``home`` and stop the explainer of every
    run under ``home/runs`` (each would otherwise idle on for its timeout after the server
    is gone)."""
    import signal

    from stride_viz.jobs import explainer
    if not (home / "jobs.sqlite").exists():
        return
    ex = LocalProcessExecutor(JobStore(home / "jobs.sqlite"))
    for job in ex.store.list():
        if job.active:
            ex.cancel(job.id)
    for run in sorted((home / "runs").iterdir()) if (home / "runs").is_dir() else []:
        record = explainer.explainer_record(ex.store, run)   # keyed by the resolved path
        if record is not None:
            try:
                os.kill(int(record["pid"]), signal.SIGTERM)
            except ProcessLookupError:                      # it has just exited
                pass


@pytest.fixture
def server(tmp_path):
    """A Streamlit server on a free port with a fresh data directory; yields (url, home)."""
    for exe in (CHROMIUM, CHROMEDRIVER):
        assert Path(exe).exists(), (f"{exe} is missing: apt-get install -y chromium chromium-driver "
                                    f"(or set STRIDE_VIZ_SKIP_BROWSER=1 to skip this test)")
    home = tmp_path / "home"
    port = _free_port()
    env = {**os.environ, "STRIDE_VIZ_HOME": str(home), **TINY_DEMO_ENV}
    log = open(tmp_path / "streamlit.log", "w")
    # no --server.address: .streamlit/config.toml alone must keep the server on loopback
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py",
         "--server.port", str(port), "--server.headless", "true", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok"
        except OSError:
            return False

    try:
        _wait(healthy, 90, "the Streamlit server")
        listening = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening and listening <= {"127.0.0.1", "::1"}, f"listens on {listening}"
        yield url, home
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        stop_jobs(home)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1400,5200"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})   # every network request
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _click(driver, selector: str, text: str) -> bool:
    """Click the first element matching ``selector`` whose text contains ``text``; False when
    there is none yet or it was redrawn under us (Streamlit reruns replace elements)."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    try:
        for el in driver.find_elements(By.CSS_SELECTOR, selector):
            if text in el.text:
                el.click()
                return True
    except (StaleElementReferenceException, WebDriverException):
        return False
    return False


def _plot_summary(driver) -> list[dict]:
    """For every Plotly chart on the page: its number of traces and of drawn points/bars/bins."""
    return driver.execute_script("""
        return Array.from(document.querySelectorAll('.js-plotly-plot')).map(el => ({
            traces: (el.data || []).length,
            // calcdata: what plotly.js actually computed to draw (points, bars, bins) per trace
            values: (el.calcdata || []).reduce((n, cd) => n + (cd ? cd.length : 0), 0),
            title: (el.layout && el.layout.title && el.layout.title.text) || ''
        }));""")


def _requested_urls(driver) -> list[str]:
    """The URLs of every request and websocket the page made since the last call (the
    performance log is drained by reading it)."""
    import json
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.append(message["params"]["url"])
    return urls


def _foreign(urls: list[str]) -> list[str]:
    """URLs that leave the machine: any http(s)/ws(s) host but 127.0.0.1 (data:, blob: and the
    browser's own chrome:// pages stay inside)."""
    return [u for u in urls if urllib.parse.urlsplit(u).scheme in ("http", "https", "ws", "wss")
            and urllib.parse.urlsplit(u).hostname != "127.0.0.1"]


_RESPONSES_SIGNATURE = """
    const el = document.querySelectorAll('.js-plotly-plot')[2];
    return el && el.calcdata ? JSON.stringify((el.data || []).map(t => [t.name, t.x, t.y])) : null;"""


def _explain_in_browser(driver, prompt: str, completion: str) -> float:
    """Type a prompt and a completion into Explore's "Explain" box and click "Explain"; the
    seconds from the click until the URL names the new query and its charts are drawn (the
    responses chart shows data other than before the click)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from stride_viz.jobs import query_id_for

    qid = query_id_for(prompt, completion)
    for selector, text in (("textarea[aria-label='Explain a new prompt']", prompt),
                           ("input[aria-label='Completion (optional)']", completion)):
        field = driver.find_element(By.CSS_SELECTOR, selector)
        field.send_keys(Keys.CONTROL, "a")      # clear(): React would restore the old value
        field.send_keys(Keys.DELETE)
        field.send_keys(text)
    before = driver.execute_script(_RESPONSES_SIGNATURE)
    # by its widget key: reading every button's text races the page's reruns (stale elements)
    button = driver.find_element(By.CSS_SELECTOR, ".st-key-explore_explain_submit button")
    t0 = time.monotonic()
    button.click()

    def shown():
        if f"query={qid}" not in driver.current_url:
            return False
        charts = _plot_summary(driver)
        after = driver.execute_script(_RESPONSES_SIGNATURE)
        return len(charts) == 3 and all(c["values"] > 0 for c in charts) and after not in (None, before)

    _wait(shown, 120, f"the charts of the new query {qid}", poll=0.05)
    return time.monotonic() - t0


def test_demo_from_launch_page_to_explore_charts(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, home = server
    browser.get(f"{url}/Launch")
    _wait(lambda: _click(browser, "button", "Launch the demo"), 90, "the Launch page's demo button")

    store = _wait(lambda: (home / "jobs.sqlite").exists() and JobStore(home / "jobs.sqlite"), 30,
                  "the job table")
    job_id = _wait(lambda: [j.id for j in store.list() if j.kind == "demo"], 30, "the demo job")[0]
    job = wait_job(store, job_id, timeout=300)
    assert job.state == "done", f"{job.error}\n{job.log}"

    # the page polls the job and, once it is done, offers the link to Explore
    _wait(lambda: _click(browser, "a", "Open in Explore"), 60, "the 'Open in Explore' link")
    def three_charts_with_data():
        charts = _plot_summary(browser)
        return charts if len(charts) == 3 and all(c["values"] > 0 for c in charts) else None

    plots = _wait(three_charts_with_data, 90, "three Plotly charts with data on Explore")
    time.sleep(1.0)  # let the last chart finish its transition before the picture
    shot = tmp_path / "explore.png"
    assert browser.save_screenshot(str(shot))
    shutil.copy(shot, "/tmp/stride_screenshot.png")
    titles = [p["title"] for p in plots]
    assert "Top influential examples" in titles[0] and "Sparsity path" in titles[1]
    assert "Operator responses (K = 16)" in titles[2]
    assert all(p["traces"] >= 1 for p in plots)
    assert "run=" in browser.current_url and "query=fact-" in browser.current_url
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid='stException']")

    # a click on a bar selects that example everywhere: the URL and the responses chart follow
    def click_first_bar():
        from selenium.webdriver.common.action_chains import ActionChains
        bars = browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")[0].find_elements(
            By.CSS_SELECTOR, "g.trace.bars g.point path")
        if not bars:
            return False
        ActionChains(browser).move_to_element(bars[-1]).click().perform()
        return True

    _wait(click_first_bar, 30, "a bar to click")
    _wait(lambda: "example=" in browser.current_url, 60, "the selected example in the URL")
    _wait(lambda: browser.execute_script(
        "const el = document.querySelectorAll('.js-plotly-plot')[2];"
        "return el && el.data.some(t => (t.name || '').startsWith('subsets containing'));"), 60,
        "the responses of the subsets holding the selected example")

    # a new prompt from Explore's "Explain" box: from the click to its charts on screen, first
    # (the run's explainer process starts and loads the model) and then warm
    times = [_explain_in_browser(browser, "Money is", " power."),
             _explain_in_browser(browser, "Time is", " money."), _explain_in_browser(browser, "Love is", " all.")]
    busy = os.getloadavg()[0] / os.cpu_count()     # > 1: more runnable processes than cores
    report = (f"Explain, click to the new query's charts: first {times[0]:.2f} s, warm {times[1]:.2f} s and "
              f"{times[2]:.2f} s (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print("\n" + report)
    (tmp_path / "explain_seconds.txt").write_text(report + "\n")
    shutil.copy(tmp_path / "explain_seconds.txt", "/tmp/stride_explain_seconds.txt")
    # the target is 3 s; on a machine shared with other work every step takes longer in proportion
    limit = 3.0 * max(1.0, busy)
    assert min(times[1:]) <= limit, f"{report}: over {limit:.1f} s"
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid='stException']")

    # hostile text: a shared link whose ?run= is Markdown + HTML, falling back to the newest run,
    # whose pool ids and texts are hostile too
    hostile_copy(job.run_dir, home)
    browser.get(f"{url}/Explore?" + urllib.parse.urlencode({"run": HOSTILE, "query": HOSTILE}))
    _wait(three_charts_with_data, 90, "three Plotly charts on the hostile run")
    _wait(lambda: "evil.example/md" in browser.find_element(By.TAG_NAME, "body").text, 30,
          "the hostile text, shown as text")
    time.sleep(1.0)
    live = browser.execute_script("""
        const outside = u => { try { const h = new URL(u, location.href);
                                     return !['data:', 'blob:'].includes(h.protocol) && h.hostname !== '127.0.0.1'; }
                               catch (e) { return true; } };
        return {
            links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href).filter(outside),
            svgLinks: Array.from(document.querySelectorAll('svg a')).map(a => a.outerHTML.slice(0, 200)),
            images: Array.from(document.querySelectorAll('img')).map(i => i.src).filter(outside),
            scripts: Array.from(document.querySelectorAll('script')).filter(s => s.textContent.includes('pwned')).length,
            pwned: window.pwned === 1,
            uploadButtons: document.querySelectorAll('[data-title*="Cloud"], [data-title*="Chart Studio"], '
                                                   + '.modebar-btn--logo').length,
        };""")
    assert live == {"links": [], "svgLinks": [], "images": [], "scripts": 0, "pwned": False,
                    "uploadButtons": 0}, live
    assert browser.execute_script("return document.querySelectorAll('.js-plotly-plot').length") == 3
    shot = tmp_path / "explore-hostile.png"
    browser.save_screenshot(str(shot))
    urls = _requested_urls(browser)
    assert urls and not _foreign(urls), _foreign(urls)

