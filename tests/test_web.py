"""HQ's web view (reconciler.web): rendered from a real HQ pass over real git, served by a live HQ, and
driven in headless Chromium through selenium (skipped when Chromium, its driver or selenium is missing;
.ci/run installs them)."""

from __future__ import annotations

import base64
import dataclasses
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from e2e_helpers import HqProcess
from test_hq import FAIL, OK, PEND, RUN, Origin, break_job, publish_relay, run_cli
from tls_helpers import CA

from reconciler import web
from reconciler.gitstore import GitStore
from reconciler.hq import Hq, make_app
from reconciler.plan import ClientState
from reconciler.report import Failure, StatusRow

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "<script>window.pwned=1</script>\"'><img src=x onerror=\"window.pwned=2\"> javascript:alert(1)"
T = TypeVar("T")


def eventually(check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Poll ``check`` until it returns something truthy (a non-empty list of elements, say), with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def counts_in(page: str, attribute: str, name: str) -> dict[str, int]:
    """The per-state count cells of the ``<tr data-<attribute>="name">`` row of a rendered page."""
    row = re.search(rf'<tr data-{attribute}="{re.escape(name)}">(.*?)</tr>', page, re.S)
    assert row is not None, f"no row for {attribute} {name}"
    return {state: int(n) for state, n in re.findall(r'<td class="n" data-state="(\w+)">(\d+)</td>', row.group(1))}


def client_rows(page: str) -> list[tuple[str, str]]:
    return re.findall(r'<tr data-client="([^"]*)" data-state="(\w+)">', page)


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return Origin(tmp_path)


def kanto_rows(n_ok: int, n_failed: int) -> list[tuple[str, ClientState, str]]:
    return ([(f"pc-kanto-{i:05d}", OK, "") for i in range(n_ok)]
            + [(f"pc-kanto-f{i:04d}", FAIL, f"exit 3: disk full on {i}") for i in range(n_failed)])


# ------------------------------------------------------------ pure rendering


@pytest.fixture
def hq(origin: Origin, tmp_path: Path) -> Hq:
    hq = Hq(GitStore(str(origin.bare), tmp_path / "hq"))
    hq.run_pass()
    relays = tmp_path / "relays"
    publish_relay(origin, relays, "relay-kanto", origin.head, {"install-7zip": kanto_rows(200, 50)})
    publish_relay(origin, relays, "relay-yokohama", origin.head, {
        "install-7zip": [("pc-yoko-001", OK, ""), ("pc-yoko-002", RUN, "installing"), ("pc-yoko-003", PEND, "")]})
    hq.run_pass()
    return hq


def test_overview_shows_job_counts_relay_tree_and_accepted_commit(hq: Hq, origin: Origin) -> None:
    assert hq.snapshot is not None
    page = web.render_overview(hq.snapshot)
    counts = counts_in(page, "job", "install-7zip")
    assert (counts["Succeeded"], counts["Failed"], counts["InProgress"], counts["Pending"]) == (201, 50, 1, 1)
    assert f'<code id="accepted-commit">{origin.head}</code>' in page
    relays = re.findall(r'<tr data-relay="([^"]+)">', page)
    assert relays.index("relay-kanto") < relays.index("relay-yokohama")  # tree order: the child after its parent
    assert set(relays) == {"relay-kanto", "relay-yokohama", "relay-osaka", "relay-fukuoka"}
    assert counts_in(page, "relay", "relay-kanto")["Failed"] == 50  # each relay's own rows
    assert counts_in(page, "relay", "relay-yokohama")["Succeeded"] == 1
    assert 'class="s-Succeeded w' in page and "style=" not in page  # bars are widths by class: no inline style


def test_job_page_filters_on_the_server_and_paginates(hq: Hq) -> None:
    rows = hq.job_rows("install-7zip")
    assert rows is not None and len(rows) == 253
    assert hq.job_rows("install-7zip") is rows  # cached while no relay ref moved

    everything = web.render_job(hq.snapshot, "install-7zip", rows, web.RowFilter())
    assert everything is not None and '253 matching clients, page 1 of 3' in everything
    assert len(client_rows(everything)) == web.PAGE_SIZE
    assert 'rel="next" href="/ui/jobs/install-7zip?page=2"' in everything
    last = web.render_job(hq.snapshot, "install-7zip", rows, web.RowFilter(page=3))
    assert last is not None and len(client_rows(last)) == 53 and 'rel="prev"' in last and 'rel="next"' not in last

    failed = web.render_job(hq.snapshot, "install-7zip", rows, web.RowFilter(state="Failed"))
    assert failed is not None and "50 matching clients" in failed
    assert {state for _, state in client_rows(failed)} == {"Failed"}
    assert "exit 3: disk full on 7" in failed  # failures with their messages
    yokohama = web.render_job(hq.snapshot, "install-7zip", rows, web.RowFilter(relay="relay-yokohama"))
    assert yokohama is not None
    assert [c for c, _ in client_rows(yokohama)] == ["pc-yoko-001", "pc-yoko-002", "pc-yoko-003"]
    assert web.render_job(hq.snapshot, "no-such-job", rows, web.RowFilter()) is None


def test_rows_filter_by_reason_and_pages_stay_bounded() -> None:
    rows = [("r", StatusRow(f"c{i}", ClientState.PENDING, None, 0, "", None, "scheduled" if i % 3 else "queued"))
            for i in range(100_000)]
    page, total = web.select_rows(rows, web.RowFilter(reason="queued", page=2))
    assert total == 33_334 and len(page) == web.PAGE_SIZE
    assert page[0][1].client == f"c{3 * web.PAGE_SIZE}"
    assert web.RowFilter.from_query({"page": "-4", "state": ""}) == web.RowFilter()


def test_a_job_of_100000_clients_renders_one_bounded_page(hq: Hq) -> None:
    rows = [(("relay-kanto", "relay-yokohama")[i % 2],
             StatusRow(f"pc-{i:06d}", FAIL if i % 10 == 0 else OK, "1.0", 1, "exit 1" if i % 10 == 0 else "", None,
                       "done")) for i in range(100_000)]
    page = web.render_job(hq.snapshot, "install-7zip", rows, web.RowFilter(state="Failed", relay="relay-kanto",
                                                                          page=100))
    assert page is not None and "10000 matching clients, page 100 of 100" in page  # every tenth, all on kanto
    assert len(client_rows(page)) == web.PAGE_SIZE and len(page) < 100_000
    assert 'rel="prev" href="/ui/jobs/install-7zip?state=Failed&amp;relay=relay-kanto&amp;page=99"' in page
    assert 'rel="next"' not in page


def test_hostile_names_and_messages_stay_inert(hq: Hq) -> None:
    snapshot = hq.snapshot
    assert snapshot is not None
    job = next(j for j in snapshot.report.jobs if j.job == "install-7zip")
    failure = Failure(HOSTILE, "relay-kanto", HOSTILE, ClientState.FAILED, None, 1, HOSTILE)
    evil = dataclasses.replace(job, job=HOSTILE, failures=(failure,), failure_count=1)
    report = dataclasses.replace(snapshot.report, jobs=(evil,))
    hostile = web.Snapshot(report, snapshot.relay_counts)
    rows = [("relay-kanto", StatusRow(HOSTILE, ClientState.FAILED, HOSTILE, 1, HOSTILE, None, HOSTILE))]
    pages = [web.render_overview(hostile), web.render_job(hostile, HOSTILE, rows, web.RowFilter(reason=HOSTILE))]
    for page in pages:
        assert page is not None
        assert "<script>window" not in page and "<img" not in page and 'href="javascript:' not in page
        assert "&lt;script&gt;window.pwned=1&lt;/script&gt;&quot;&#x27;&gt;&lt;img" in page
        assert re.findall(r"<script\b[^>]*>", page) == ['<script src="/ui/static/web.js" defer>']
    assert f'href="/ui/jobs/%3Cscript%3Ewindow.pwned%3D1%3C%2Fscript%3E%22%27%3E%3Cimg' in pages[0]


def test_validation_errors_of_the_newest_main_are_shown_next_to_the_accepted_commit(hq: Hq, origin: Origin) -> None:
    accepted = origin.head
    broken = origin.commit("break a job", break_job)
    hq.run_pass()
    assert hq.snapshot is not None
    page = web.render_overview(hq.snapshot)
    assert f'<code id="accepted-commit">{accepted}</code>' in page
    assert f"<code>{broken[:12]}</code> <span id=\"main-validity\">INVALID</span>" in page
    errors = re.search(r'<ul class="errors" id="validation-errors">(.*?)</ul>', page, re.S)
    assert errors is not None and "broken.yaml" in errors.group(1)
    assert counts_in(page, "job", "install-7zip")["Failed"] == 50  # the accepted commit's jobs go on


def test_the_token_file_needs_listen(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    done = run_cli("hq", "--origin", str(tmp_path / "none.git"), "--workdir", str(tmp_path / "hq"),
                   "--ui-token-file", str(token), "--once")
    assert done.returncode == 2 and "--ui-token-file needs --listen" in done.stderr


def call(app: Any, path: str, query: str = "", headers: dict[str, str] | None = None) -> tuple[str, dict[str, str],
                                                                                              str]:
    """One WSGI request to ``app``: (status, headers, body)."""
    got: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]]) -> None:
        got["status"], got["headers"] = status, dict(response_headers)

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query,
               **{"HTTP_" + k.upper().replace("-", "_"): v for k, v in (headers or {}).items()}}
    body = b"".join(app(environ, start_response)).decode()
    return got["status"], got["headers"], body


def test_the_view_is_strict_html_behind_its_optional_token(hq: Hq) -> None:
    view = web.WebView(lambda: hq.snapshot, hq.job_rows, b"t0ken")
    app = make_app(lambda: None, None, None, None, view=view)
    status, headers, _ = call(app, "/")
    assert status.startswith("401") and headers["WWW-Authenticate"].startswith("Basic ")
    assert call(app, "/", headers={"Authorization": "Bearer wrong"})[0].startswith("401")
    status, headers, page = call(app, "/", headers={"Authorization": "Bearer t0ken"})
    assert status == "200 OK" and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["Content-Security-Policy"] and "unsafe" not in headers["Content-Security-Policy"]
    basic = "Basic " + base64.b64encode(b"anyone:t0ken").decode()
    status, _, fragment = call(app, "/ui/jobs/install-7zip", "fragment=1&state=Failed", {"Authorization": basic})
    assert status == "200 OK" and fragment.startswith('<main id="content">') and "<html" not in fragment
    assert call(app, "/ui/jobs/nope", headers={"Authorization": basic})[0].startswith("404")
    assert call(app, "/healthz")[0] == "200 OK"  # the token guards the view only
    assert call(app, "/ui/static/web.js")[1]["Content-Type"].startswith("text/javascript")


# ------------------------------------------------------------------ live HQ


@pytest.fixture
def live(origin: Origin, tmp_path: Path) -> Iterator[HqProcess]:
    hq = HqProcess(str(origin.bare), tmp_path / "hq", "--poll-interval", "1").start()
    try:
        yield hq
    finally:
        hq.stop()


def wait_for_page(url: str, check: Callable[[str], bool], what: str, **kwargs: Any) -> str:
    def fetch() -> str | None:
        response = requests.get(url, timeout=5, **kwargs)
        return response.text if response.status_code == 200 and check(response.text) else None
    return eventually(fetch, what)


@pytest.mark.slow
def test_a_live_hq_serves_the_same_counts_without_javascript(live: HqProcess, origin: Origin, tmp_path: Path) -> None:
    publish_relay(origin, tmp_path / "relays", "relay-kanto", origin.head, {"install-7zip": kanto_rows(7, 2)})
    page = wait_for_page(f"{live.url}/", lambda p: 'data-relay="relay-kanto"' in p and ">7</td>" in p,
                         "the overview with relay-kanto's rows")
    counts = counts_in(page, "job", "install-7zip")
    assert (counts["Succeeded"], counts["Failed"]) == (7, 2)
    job = requests.get(f"{live.url}/ui/jobs/install-7zip", params={"state": "Failed"}, timeout=5)
    assert job.status_code == 200 and "unsafe" not in job.headers["Content-Security-Policy"]
    assert [s for _, s in client_rows(job.text)] == ["Failed", "Failed"]


@pytest.mark.slow
def test_a_live_hq_serves_the_view_over_its_tls_behind_the_token(origin: Origin, tmp_path: Path) -> None:
    ca = CA(tmp_path / "ca", "view-ca")
    cert = ca.issue("hq")
    token = tmp_path / "ui-token"
    token.write_text("v13w-t0ken\n")
    hq = HqProcess(str(origin.bare), tmp_path / "hq", "--tls-cert", str(cert.cert), "--tls-key", str(cert.key),
                   "--ui-token-file", str(token)).start()
    try:
        assert hq.url.startswith("https://")
        verify = str(ca.cert_file)
        refused = requests.get(f"{hq.url}/", timeout=5, verify=verify)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Basic ")
        assert requests.get(f"{hq.url}/", timeout=5, verify=verify, auth=("admin", "wrong")).status_code == 401
        page = wait_for_page(f"{hq.url}/", lambda p: 'id="jobs"' in p, "the overview", verify=verify,
                             auth=("admin", "v13w-t0ken"))
        assert "install-7zip" in page
        bearer = requests.get(f"{hq.url}/ui/jobs/install-7zip", headers={"Authorization": "Bearer v13w-t0ken"},
                              timeout=5, verify=verify)
        assert bearer.status_code == 200 and "Job install-7zip" in bearer.text
        assert requests.get(f"{hq.url}/healthz", timeout=5, verify=verify).ok
    finally:
        hq.stop()


# ------------------------------------------------------------------ browser


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1440,1300")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def dom_counts(driver: Any, attribute: str, name: str) -> dict[str, int]:
    from selenium.webdriver.common.by import By

    cells = driver.find_elements(By.CSS_SELECTOR, f'tr[data-{attribute}="{name}"] td[data-state]')
    return {c.get_attribute("data-state"): int(c.text) for c in cells}


def screenshot(driver: Any, tmp_path: Path, name: str) -> Path:
    """Saved under the test's tmp dir; docs/web-view.png is refreshed from it with RECONCILER_SCREENSHOT_DOCS=1."""
    import os

    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 0
    if os.environ.get("RECONCILER_SCREENSHOT_DOCS") == "1" and name == "overview":
        shutil.copyfile(path, ROOT / "docs" / "web-view.png")
    return path


@pytest.mark.slow
def test_browser_shows_counts_and_a_filter_narrows_the_rows(browser: Any, live: HqProcess, origin: Origin,
                                                             tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    relays = tmp_path / "relays"
    publish_relay(origin, relays, "relay-kanto", origin.head, {"install-7zip": kanto_rows(12, 3),
                                                               "install-teams-meeting": kanto_rows(4, 0)})
    publish_relay(origin, relays, "relay-yokohama", origin.head, {
        "install-7zip": [("pc-yoko-001", OK, ""), ("pc-yoko-002", RUN, "installing")]})
    wait_for_page(f"{live.url}/", lambda p: 'data-relay="relay-yokohama"' in p and ">13</td>" in p,
                  "HQ to aggregate both relays")
    browser.get(f"{live.url}/")
    counts = dom_counts(browser, "job", "install-7zip")
    assert (counts["Succeeded"], counts["Failed"], counts["InProgress"]) == (13, 3, 1)
    assert dom_counts(browser, "relay", "relay-kanto")["Succeeded"] == 16
    plain = requests.get(f"{live.url}/", timeout=5).text  # JavaScript off: the same counts in the HTML
    assert counts_in(plain, "job", "install-7zip") == counts
    screenshot(browser, tmp_path, "overview")

    browser.find_element(By.LINK_TEXT, "install-7zip").click()
    eventually(lambda: browser.find_elements(By.ID, "row-count"), "the job page")
    assert "17 matching clients" in browser.find_element(By.ID, "row-count").text

    def filter_failed() -> bool | None:
        try:
            Select(browser.find_element(By.NAME, "state")).select_by_value("Failed")
            browser.find_element(By.CSS_SELECTOR, "#filter button").click()
            return True
        except StaleElementReferenceException:  # the live refresh swapped <main> in between: do it again
            return None

    eventually(filter_failed, "submitting the filter")
    eventually(lambda: "state=Failed" in browser.current_url and "3 matching clients"
               in browser.find_element(By.ID, "row-count").text, "the filtered job page")
    states = [r.get_attribute("data-state") for r in browser.find_elements(By.CSS_SELECTOR, "#rows tbody tr")]
    assert states == ["Failed"] * 3
    screenshot(browser, tmp_path, "job-failed")


@pytest.mark.slow
def test_browser_sees_a_new_failure_without_reload_and_it_stays_inert(browser: Any, live: HqProcess,
                                                                      origin: Origin, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    relays = tmp_path / "relays"
    publish_relay(origin, relays, "relay-kanto", origin.head, {"install-7zip": kanto_rows(5, 0)})
    wait_for_page(f"{live.url}/", lambda p: ">5</td>" in p, "HQ to aggregate relay-kanto")
    browser.get(f"{live.url}/ui/jobs/install-7zip")
    assert browser.find_elements(By.CSS_SELECTOR, 'tr[data-state="Failed"]') == []
    browser.execute_script("window.loadedOnce = 'yes';")  # gone if the page were reloaded

    rows = kanto_rows(5, 0) + [("pc-kanto-evil", FAIL, HOSTILE)]
    publish_relay(origin, relays, "relay-kanto", origin.head, {"install-7zip": rows})
    failed = eventually(lambda: browser.find_elements(By.CSS_SELECTOR, '#rows tr[data-state="Failed"]'),
                        "the failure to appear in the page", timeout=45)
    assert failed[0].get_attribute("data-client") == "pc-kanto-evil"
    assert failed[0].find_element(By.CSS_SELECTOR, "td.msg").text == HOSTILE  # shown as text, never as markup
    assert browser.execute_script("return window.loadedOnce") == "yes"  # no reload: the script swapped <main>
    assert browser.execute_script("return window.pwned === undefined")
    assert browser.find_elements(By.CSS_SELECTOR, "main img, main script") == []
    assert "Failures (1)" in browser.find_element(By.TAG_NAME, "main").text
    screenshot(browser, tmp_path, "job-live-failure")
