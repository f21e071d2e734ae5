"""The web console in a real browser: Debian's chromium, headless, driven through chromium-driver by Selenium
(both installed by `make tools`; the driver's path is given, so Selenium Manager downloads nothing), against a
real deployment behind `uvicorn api.rest:app` (tests/api_server.py).

Covered: an operator logs in with a key, finds the VM in the VM list, starts a drill (test failover) of a
protected VM from its page, follows the job on its page as the event stream updates it, and reads the drill's
report on the VM's page and the dashboard; then cleans the drill up with its button, filters the job list, and
runs a plan's dry run. The plan's drill, started with its button, waits for the operator at its manual action:
cancelled with the job page's button, restarted as a new job with the next, resumed with a note and followed to
its end; the job list filtered by the VM leaves the plan's jobs out. A reader sees no action button and,
posting one's form from the browser with its own session and CSRF token, gets 403 and nothing starts.

A failed test leaves a screenshot of the page and the page's HTML in its tmp_path (kept for failed tests).
With ASR_CONSOLE_SCREENSHOTS=DIR the tests also save a screenshot of each page they pass through into DIR:
`make console-screenshots` regenerates docs/console/ that way.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_server import ApiDeployment, api_deployment
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from api import service

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
JOB_TIMEOUT = 90
FINISHED = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiDeployment]:
    """The deployment with one protected VM, web01 (two small disks), on a quiet policy (no delta cycle takes
    its lock while the browser drives it), and a plan of it whose drill first waits for the operator."""
    # One task at a time per host agent is all a drill of one VM needs, and the workers start faster.
    with api_deployment(tmp_path_factory.mktemp("console"), host_concurrency=1) as deployment:
        site = deployment.site
        vm_id = site.create_vm("host1", "web01", [("disk0", "4M", "vhd"), ("disk1", "2M", "raw")])
        policy_id = site.create_policy("quiet", copy_frequency_s=900)
        site.wait_job(site.protect(vm_id, policy_id=policy_id), timeout=JOB_TIMEOUT)
        service.create_plan("web-drill", [{"name": "web", "vms": ["host1/web01"], "before": [{
            "kind": "manual", "name": "dns", "instructions": "Point www at the test network"}]}],
                            "The web tier's drill")
        yield deployment


@pytest.fixture
def browser(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    """Headless chromium with a profile of its own; a screenshot and the HTML of the page when the test fails."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: `make tools` installs Debian's chromium and chromium-driver",
                    pytrace=False)
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything, should it ever run
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000", "--no-first-run", "--disable-extensions",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console: script errors, CSP
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER),
                                                                log_output=str(tmp_path / "chromedriver.log")))
    driver.set_page_load_timeout(30)
    try:
        yield driver
        # No script error and nothing the Content-Security-Policy refused, on any page the test went through
        # (the refusals a test provokes, 403 and 404 pages, are logged as failed loads: not errors here).
        problems = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"
                    and "Failed to load resource: the server responded with a status of 40" not in entry["message"]]
        assert not problems, f"the browser's console reported errors: {problems}"
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            try:
                driver.save_screenshot(str(tmp_path / "failed-page.png"))
                (tmp_path / "failed-page.html").write_text(driver.page_source)
                print(f"screenshot of the failed page ({driver.current_url}): {tmp_path / 'failed-page.png'}")
            except WebDriverException as error:
                print(f"no screenshot of the failed page: {error}")
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def snapshot(browser: WebDriver, name: str) -> None:
    """With ASR_CONSOLE_SCREENSHOTS=DIR (`make console-screenshots`: docs/console/), the page as `DIR/NAME.png`,
    the screenshots docs/console.md shows."""
    folder = os.environ.get("ASR_CONSOLE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / f"{name}.png"))


def log_in(browser: WebDriver, url: str, key: str) -> None:
    browser.get(f"{url}/console/")
    assert "/console/login" in browser.current_url, "a browser without a session should be sent to the login"
    snapshot(browser, "login")
    browser.find_element(By.ID, "api_key").send_keys(key)
    go(browser, browser.find_element(By.ID, "login"))
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.ID, "role"))


def go(browser: WebDriver, element: WebElement) -> None:
    """Click `element` (a link or a form's button) and wait until the page it leads to has replaced this one: a
    lookup right after a click can otherwise still find the page before it (a form posted, its answer not
    rendered yet)."""
    page = browser.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(browser, 15, poll_frequency=0.1).until(lambda _driver: replaced(page))


def go_confirmed(browser: WebDriver, element: WebElement, question: str) -> None:
    """`go` for a form that asks first (class `confirm`): the browser's dialog must ask `question`; accepted."""
    page = browser.find_element(By.TAG_NAME, "html")
    element.click()
    dialog = WebDriverWait(browser, 5).until(expected_conditions.alert_is_present())
    assert dialog.text == question
    dialog.accept()
    WebDriverWait(browser, 15, poll_frequency=0.1).until(lambda _driver: replaced(page))


def wait_for_operator(browser: WebDriver) -> str:
    """Waits on a job page until the job waits for the operator (the page reloads to offer resume); its id."""
    WebDriverWait(browser, JOB_TIMEOUT, poll_frequency=0.2).until(
        lambda driver: driver.find_elements(By.ID, "resume-job") and text_of(driver, "job-state") == "waiting_action")
    return browser.current_url.rsplit("/", 1)[1]


def replaced(element: WebElement) -> bool:
    """Whether `element` belongs to a document the browser has left. (Selenium's `staleness_of` expects a
    StaleElementReferenceException; chromedriver answers some lookups of a left document's node with "unknown
    error: ... Node with given id does not belong to the document" instead: seen failing this test.)"""
    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as error:
        if "does not belong to the document" in (error.msg or ""):
            return True
        raise
    return False


def text_of(browser: WebDriver, element_id: str) -> str | None:
    try:
        return browser.find_element(By.ID, element_id).text
    except (NoSuchElementException, StaleElementReferenceException):
        return None


def follow_job_page(browser: WebDriver) -> tuple[str, bool]:
    """Waits on a job page until the job has finished; returns its final state and whether the page showed a
    snapshot from the event stream before (live progress)."""
    seen_live = False

    def finished(driver: WebDriver) -> str | None:
        nonlocal seen_live
        seen_live = seen_live or driver.execute_script(
            "const job = document.getElementById('job'); return !!job && job.dataset.live === 'true';")
        state = text_of(driver, "job-state")
        active = driver.execute_script("const job = document.getElementById('job'); "
                                       "return job ? job.dataset.active : null;")
        # Finished, and the page is the one rendered after the end (its actions are those of the final state).
        return state if state in FINISHED and active == "false" else None

    state = WebDriverWait(browser, JOB_TIMEOUT, poll_frequency=0.2).until(finished)
    return state, seen_live


def test_an_operator_runs_a_drill_from_the_console_and_reads_its_report(deployment: ApiDeployment,
                                                                       browser: WebDriver) -> None:
    log_in(browser, deployment.url, deployment.role_keys["operator"])
    assert (text_of(browser, "role") or "").lower() == "operator"
    row = browser.find_element(By.CSS_SELECTOR, '#items tr[data-vm="web01"]')
    assert "protected" in row.text and "Healthy" in row.text and "never" in row.text  # no drill has passed yet

    # The VM list, and the VM's page from it.
    go(browser, browser.find_element(By.LINK_TEXT, "VMs"))
    [row] = browser.find_elements(By.CSS_SELECTOR, "table.vms tbody tr")
    assert row.get_attribute("data-vm") == "host1/web01"
    assert "protected" in row.text and "Healthy" in row.text and "2" in row.text  # its two disks
    snapshot(browser, "vms")
    go(browser, row.find_element(By.LINK_TEXT, "web01"))
    assert text_of(browser, "vm-state") == "protected"
    assert browser.find_elements(By.CSS_SELECTOR, "#points tr.point"), "protection should leave a recovery point"
    go(browser, browser.find_element(By.ID, "start-drill"))

    # The job's page, following the drill as the event stream updates it, until it has ended.
    assert "/console/jobs/" in browser.current_url
    job_id = browser.current_url.rsplit("/", 1)[1]
    state, seen_live = follow_job_page(browser)
    assert state == "succeeded", f"the drill ended {state}: {text_of(browser, 'job-error')}"
    assert seen_live, "the job page should have shown the job's progress from its event stream"
    assert browser.find_element(By.ID, "job-progress").get_attribute("value") == "100"
    assert not browser.find_elements(By.ID, "cancel-job"), "an ended job cannot be cancelled"
    snapshot(browser, "job")

    # The drill's report on the VM's page: verified against the point's manifest roots, with its RTO.
    go(browser, browser.find_element(By.ID, "job-vm"))
    record = browser.find_element(By.CSS_SELECTOR, "#failovers tr[data-failover]")
    assert record.find_element(By.CLASS_NAME, "failover-kind").text == "test"
    assert record.find_element(By.CLASS_NAME, "failover-status").text == "succeeded"
    assert record.find_element(By.CLASS_NAME, "failover-verified").text == "manifest roots match"
    assert record.find_element(By.CLASS_NAME, "failover-rto").text != "—"
    assert record.find_element(By.LINK_TEXT, job_id[:8])
    assert not browser.find_elements(By.ID, "start-drill"), "a second drill is refused until this one is cleaned up"
    snapshot(browser, "vm")

    # The dashboard now has the drill as the VM's last passed one.
    go(browser, browser.find_element(By.LINK_TEXT, "Dashboard"))
    last_drill = browser.find_element(By.CSS_SELECTOR, '#items tr[data-vm="web01"] td.last-drill').text
    assert "never" not in last_drill and "UTC" in last_drill and "RTO" in last_drill
    snapshot(browser, "dashboard")

    # Cleaning up, with its button.
    go(browser, browser.find_element(By.LINK_TEXT, "web01"))
    go(browser, browser.find_element(By.ID, "cleanup-drill"))
    assert follow_job_page(browser)[0] == "succeeded"
    go(browser, browser.find_element(By.ID, "job-vm"))
    assert browser.find_element(By.CSS_SELECTOR, "#failovers .failover-status").text == "cleaned_up"
    assert browser.find_elements(By.ID, "start-drill"), "once cleaned up, the VM may be drilled again"

    # The job list, filtered: the drill alone.
    go(browser, browser.find_element(By.LINK_TEXT, "Jobs"))
    Select(browser.find_element(By.ID, "filter-state")).select_by_value("succeeded")
    browser.find_element(By.ID, "filter-kind").send_keys("test_failover")
    go(browser, browser.find_element(By.ID, "filter"))
    assert "kind=test_failover" in browser.current_url
    assert [row.get_attribute("data-job") for row in browser.find_elements(By.CSS_SELECTOR, "table.jobs tbody tr")] \
        == [job_id]
    snapshot(browser, "jobs")

    # The plan's page and its dry run: it could run a drill now, and nothing started.
    jobs_before = len(service.list_jobs())
    go(browser, browser.find_element(By.LINK_TEXT, "Plans"))
    snapshot(browser, "plans")
    go(browser, browser.find_element(By.LINK_TEXT, "web-drill"))
    assert "host1/web01" in browser.find_element(By.ID, "groups").text
    Select(browser.find_element(By.ID, "validate-operation")).select_by_value("test_failover")
    go(browser, browser.find_element(By.ID, "validate-plan"))
    assert "could run a test failover now: web (web01)" in browser.find_element(By.ID, "validation").text
    Select(browser.find_element(By.ID, "validate-operation")).select_by_value("failback")
    go(browser, browser.find_element(By.ID, "validate-plan"))
    assert "could not start" in browser.find_element(By.ID, "validation").text
    assert len(service.list_jobs()) == jobs_before, "a dry run started a job"
    snapshot(browser, "plan")

    # The plan's drill waits for the operator at its manual action: cancelled with the job page's button.
    go_confirmed(browser, browser.find_element(By.ID, "plan-drill"),
                 "Start a test failover of every VM of plan web-drill?")
    cancelled = wait_for_operator(browser)
    assert "Point www at the test network" in browser.find_element(By.ID, "waiting-for").text
    go_confirmed(browser, browser.find_element(By.ID, "cancel-job"), "Cancel this job?")
    assert browser.current_url.endswith(f"/console/jobs/{cancelled}") and text_of(browser, "job-state") == "cancelled"
    job = service.show_job(cancelled)
    assert job["state"] == "cancelled" and {step["state"] for step in job["steps"]} == {"cancelled"}, job
    assert not browser.find_elements(By.ID, "resume-job") and not browser.find_elements(By.ID, "cancel-job")

    # Restarted: a new job of the same plan, which waits again; resumed with a note, it runs to its end.
    go(browser, browser.find_element(By.ID, "restart-job"))
    restarted = wait_for_operator(browser)
    assert restarted != cancelled and service.show_job(cancelled)["state"] == "cancelled"
    assert (service.show_job(restarted)["kind"], service.show_job(restarted)["plan"]) == ("plan_test_failover",
                                                                                          "web-drill")
    browser.find_element(By.CSS_SELECTOR, '#job-actions input[name="note"]').send_keys("www points at the test net")
    go(browser, browser.find_element(By.ID, "resume-job"))
    state, _seen_live = follow_job_page(browser)
    assert state == "succeeded", f"the plan's drill ended {state}: {text_of(browser, 'job-error')}"
    [manual] = [step for step in service.show_job(restarted)["steps"] if step["name"].endswith("before action dns")]
    assert manual["state"] == "succeeded" and manual["result"]["note"] == "www points at the test net", manual

    # The job list filtered by the VM: web01's own jobs, not the plan's.
    go(browser, browser.find_element(By.LINK_TEXT, "Jobs"))
    listed = {row.get_attribute("data-job") for row in browser.find_elements(By.CSS_SELECTOR, "table.jobs tbody tr")}
    assert {cancelled, restarted} <= listed
    browser.find_element(By.ID, "filter-vm").send_keys("host1/web01")
    go(browser, browser.find_element(By.ID, "filter"))
    assert "vm=host1%2Fweb01" in browser.current_url
    rows = [row.get_attribute("data-job") for row in browser.find_elements(By.CSS_SELECTOR, "table.jobs tbody tr")]
    assert rows == [job["id"] for job in service.list_jobs(vm="host1/web01")] and job_id in rows
    assert not {cancelled, restarted} & set(rows), "the VM's filter should leave the plan's jobs out"


def test_a_reader_sees_no_action_and_is_refused_one(deployment: ApiDeployment, browser: WebDriver) -> None:
    log_in(browser, deployment.url, deployment.role_keys["reader"])
    assert (text_of(browser, "role") or "").lower() == "reader"
    jobs_before = len(service.list_jobs(vm="host1/web01"))
    browser.get(f"{deployment.url}/console/vms/host1/web01")
    assert text_of(browser, "vm-state") == "protected"
    assert not browser.find_elements(By.ID, "vm-actions") and not browser.find_elements(By.ID, "start-drill")
    go(browser, browser.find_element(By.CSS_SELECTOR, "#failovers tr[data-failover] a"))  # a drill's job page
    assert browser.find_elements(By.ID, "steps") and not browser.find_elements(By.ID, "job-actions")

    # The drill's form posted from this page anyway, with the reader's own session and CSRF token: 403.
    status = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const csrf = document.querySelector('input[name="csrf"]').value;
        fetch('/console/vms/host1/web01/drill', {method: 'POST', body: new URLSearchParams({csrf}),
                                                 redirect: 'manual'})
            .then(response => response.text().then(text => done([response.status, text])))
            .catch(error => done([0, String(error)]));
    """)
    assert status[0] == 403 and "operator role" in status[1], status
    assert len(service.list_jobs(vm="host1/web01")) == jobs_before, "a refused drill started a job"
    # And a page the reader may see says what was refused, in the browser too.
    browser.get(f"{deployment.url}/console/jobs/no-such-job")
    assert "no-such-job" in (text_of(browser, "error-message") or "")
