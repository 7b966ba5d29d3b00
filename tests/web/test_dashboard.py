"""The coordinator's dashboard in a real browser (headless chromium), on real run folders."""

from __future__ import annotations

import json
import shutil

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from .conftest import shoot


def loaded(driver, img) -> bool:
    return driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)


def test_the_run_list_shows_every_run_with_its_status_epsilon_and_fup(browser, dashboard, tiny_finished_run, screenshots):
    browser.get(dashboard.url + "/")
    rows = {r.get_attribute("data-run"): r for r in browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")}
    assert set(rows) == {tiny_finished_run.name, "tiny-deployment", "tiny-live", "tiny-broken", "tiny-compare"}
    assert "comparison" in rows["tiny-compare"].text
    done = rows[tiny_finished_run.name]
    assert "finished" in done.find_element(By.CSS_SELECTOR, ".status").text
    report = json.loads((tiny_finished_run / "report.json").read_text())
    assert f"{report['headline']['fup']:.3g}" in done.text
    for site, eps in report["headline"]["epsilon"].items():
        assert f"{site} {eps:.3g}" in done.find_element(By.CSS_SELECTOR, ".eps").text
    assert "running" in rows["tiny-live"].text
    assert rows["tiny-broken"].find_elements(By.CSS_SELECTOR, ".warn")  # flagged, still listed
    shoot(browser, screenshots, "dashboard_runs")


def test_a_simulations_page_shows_real_beside_synthetic_curves_tables_release_and_gate(browser, dashboard, tiny_finished_run, screenshots):
    browser.get(f"{dashboard.url}/runs/{tiny_finished_run.name}")
    grids = browser.find_elements(By.CSS_SELECTOR, "img.grid")
    WebDriverWait(browser, 60).until(lambda d: all(loaded(d, g) for g in grids))
    kinds = {g.get_attribute("class") for g in grids}
    assert kinds == {"grid synthetic", "grid real"}  # a simulation's coordinator holds the real images
    for plot in ("plot-epsilon", "plot-loss"):
        svg = browser.find_element(By.CSS_SELECTOR, f"#{plot} svg")
        assert svg.size["width"] > 200 and svg.find_elements(By.CSS_SELECTOR, "path")
    for table in ("fidelity", "utility", "privacy"):
        assert len(browser.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")) >= 2, table
    assert browser.find_element(By.ID, "signature").text == "verified"
    assert browser.find_element(By.ID, "gate").text == "passed"
    assert "FUP" in browser.find_element(By.ID, "headline").text
    browser.set_window_size(1280, 1000)
    shoot(browser, screenshots, "dashboard_run", full=False)  # the README's picture: the top of a run's page
    shoot(browser, screenshots, "dashboard_run_full")


def test_a_comparisons_page_leads_to_each_of_its_runs(browser, dashboard):
    browser.get(f"{dashboard.url}/runs/tiny-compare")
    browser.find_element(By.LINK_TEXT, "tiny-compare/ddpm").click()
    WebDriverWait(browser, 30).until(EC.text_to_be_present_in_element((By.ID, "run-name"), "tiny-compare/ddpm"))
    grids = browser.find_elements(By.CSS_SELECTOR, "img.grid")
    WebDriverWait(browser, 60).until(lambda d: all(loaded(d, g) for g in grids))
    assert {g.get_attribute("class") for g in grids} == {"grid synthetic", "grid real"}  # a simulation's arm
    assert browser.find_element(By.CSS_SELECTOR, "#plot-epsilon svg")


def test_a_deployments_page_shows_synthetic_images_and_aggregates_only(browser, dashboard):
    browser.get(f"{dashboard.url}/runs/tiny-deployment")
    assert browser.find_elements(By.CSS_SELECTOR, "img.grid.synthetic")
    assert not browser.find_elements(By.CSS_SELECTOR, "img.grid.real")
    assert "never leave the hospitals" in browser.find_element(By.ID, "no-real").text
    assert "stay at the hospitals" in browser.find_element(By.ID, "plot-loss").text  # no loss curves either
    assert not browser.find_elements(By.ID, "report-link")  # report.html embeds real images beside synthetic ones
    for path in ("grid/real/hospital_a/0.png", "report.html"):
        assert httpx.get(f"{dashboard.url}/runs/tiny-deployment/{path}").status_code == 403, path


def test_a_tampered_release_shows_its_signature_failed(browser, dashboard, runs_root):
    tampered = runs_root / "tiny-tampered"
    shutil.copytree(runs_root / "tiny-deployment", tampered)
    card = tampered / "synthetic" / "data_card.json"
    card.write_text(card.read_text().replace("{", "{ ", 1))
    try:
        browser.get(f"{dashboard.url}/runs/tiny-tampered")
        assert browser.find_element(By.ID, "signature").text == "failed"
        assert "data_card.json" in browser.find_element(By.ID, "release").text
    finally:
        shutil.rmtree(tampered)


def test_clicking_from_the_list_to_a_run_and_to_a_comparison(browser, dashboard, tiny_finished_run, screenshots):
    browser.get(dashboard.url + "/")
    browser.find_element(By.LINK_TEXT, tiny_finished_run.name).click()
    WebDriverWait(browser, 30).until(EC.text_to_be_present_in_element((By.ID, "run-name"), tiny_finished_run.name))
    browser.back()
    for name in (tiny_finished_run.name, "tiny-deployment"):
        browser.find_element(By.CSS_SELECTOR, f"input[value='{name}']").click()
    browser.find_element(By.ID, "compare").click()
    WebDriverWait(browser, 30).until(EC.presence_of_element_located((By.ID, "comparison")))
    figures = [r.find_element(By.TAG_NAME, "td").text for r in browser.find_elements(By.CSS_SELECTOR, "#comparison tbody tr")]
    assert {"fup", "fidelity_F", "utility_U", "privacy_P", "fid"} <= set(figures)
    diffs = [d.text for d in browser.find_elements(By.CSS_SELECTOR, "#comparison td.diff")]
    assert diffs and all(d in ("+0", "–") for d in diffs)  # the same release twice: no difference
    legend = browser.find_element(By.CSS_SELECTOR, "#overlay svg").text
    assert f"{tiny_finished_run.name}: hospital_a" in legend and "tiny-deployment: hospital_a" in legend
    shoot(browser, screenshots, "dashboard_compare")


def test_a_run_in_progress_updates_live_without_a_reload(browser, dashboard, runs_root):
    live = runs_root / "tiny-live"
    browser.get(f"{dashboard.url}/runs/tiny-live")
    assert browser.find_element(By.ID, "rounds").text.startswith("0 / 2")
    browser.execute_script("window.notReloaded = true")
    ledger = {site: {"epsilon": eps, "epsilon_budget": budget, "delta": 1e-5, "rounds_trained": 1, "declined_rounds": [],
                     "rejected_rounds": [], "history": [{"round": 1, "epsilon": eps, "declined": False, "rejected": False}]}
              for site, eps, budget in (("hospital_a", 2.5, 8.0), ("hospital_c", 1.5, 5.0))}
    (live / "privacy_ledger.json").write_text(json.dumps(ledger))  # what the server writes as a round ends
    WebDriverWait(browser, 30).until(EC.text_to_be_present_in_element((By.ID, "rounds"), "1 / 2"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#sites-progress tbody tr")
    assert {r.get_attribute("data-site") for r in rows} == {"hospital_a", "hospital_c"}
    assert "2.5" in browser.find_element(By.ID, "sites-progress").text
    WebDriverWait(browser, 30).until(lambda d: "hospital_a" in d.find_element(By.ID, "plot-epsilon").text)
    assert browser.execute_script("return window.notReloaded === true")


def test_a_request_for_another_host_name_is_refused(dashboard):
    """A web page elsewhere cannot read the dashboard through DNS rebinding."""
    assert httpx.get(dashboard.url + "/api/runs", headers={"Host": "attacker.example"}).status_code == 400
    assert httpx.get(dashboard.url + "/api/runs").status_code == 200


def test_a_half_written_or_missing_run_gets_a_clear_message_never_a_500(browser, dashboard):
    r = httpx.get(f"{dashboard.url}/runs/tiny-broken")
    assert r.status_code == 200
    browser.get(f"{dashboard.url}/runs/tiny-broken")
    problems = " ".join(p.text for p in browser.find_elements(By.CSS_SELECTOR, ".problem"))
    assert "config.json is unreadable or half-written" in problems and "report.json is unreadable or half-written" in problems
    for path in ("/runs/no-such-run", "/runs/no-such-run/grid/synthetic/0.png"):
        r = httpx.get(dashboard.url + path)
        assert r.status_code == 404 and "No run folder named" in r.text, path
    for path in ("/runs/..%2F..%2Fetc%2Fpasswd", "/runs/%2E%2E/grid/synthetic/0.png", "/runs/.public_prior"):
        r = httpx.get(dashboard.url + path)
        assert r.status_code == 404 and "root:" not in r.text, path
    browser.get(f"{dashboard.url}/runs/no-such-run")
    assert "No run folder named 'no-such-run'" in browser.find_element(By.ID, "error").text
