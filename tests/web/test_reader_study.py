"""A three-reader blinded study end to end through the browser, with a server killed mid-study,
and its statistics checked against values computed here from first principles."""

from __future__ import annotations

import itertools
import json
import math
import re
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from ..conftest import REPO
from .conftest import Server, shoot

READERS = ["r1", "r2", "r3"]
IMAGES = 12


def scripted_answer(reader: str, item: int, truth: str) -> tuple[int, str]:
    """Three readers who partly see through the release, and partly do not, each in their own way."""
    real = truth == "real"
    if reader == "r1":
        rating = (4 if real else 2) + (1 if item % 3 == 0 else 0)
    elif reader == "r2":
        rating = (3 if item % 4 == 1 else 5) if real else (3 if item % 4 == 2 else 1)
    else:
        rating = (item * 7) % 5 + 1
    return rating, ("real" if rating >= 3 else "synthetic")


@pytest.fixture(scope="module")
def created(runs_root, tiny_finished_run, tmp_path_factory):
    run = runs_root / tiny_finished_run.name
    server = Server(["reader-study", "serve", str(run / "reader_studies" / "e2e" / "study.sqlite")],
                    tmp_path_factory.mktemp("reader_log") / "reader.log")
    out = subprocess.run([sys.executable, "-m", "simulations.cli", "reader-study", "create", str(run), "--name", "e2e",
                          "--images", str(IMAGES), "--consenting-sites", "hospital_a", "--readers", *READERS,
                          "--base-url", server.url], cwd=REPO, capture_output=True, text=True, check=True)
    links = dict(line.strip().split(": ", 1) for line in out.stdout.splitlines() if line.startswith("  "))
    assert set(links) == set(READERS)
    db = run / "reader_studies" / "e2e" / "study.sqlite"
    yield server.start(), links, db
    server.stop()


def truth_of(db, public_id: str) -> tuple[int, str]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT id, truth FROM items WHERE public_id = ?", (public_id,)).fetchone()


def answers(db) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT r.name, a.item_id, a.rating, a.guess FROM answers a JOIN readers r ON r.id = a.reader_id "
                           "ORDER BY r.name, a.item_id").fetchall()


# Read in one script call: element handles go stale while the browser moves to the next page.
ITEM_ON_SCREEN = ("const i = document.getElementById('item'), f = document.querySelector('input[name=item]');"
                  "return document.readyState === 'complete' && i && f && i.complete && i.naturalWidth > 0 ? f.value : null;")
NAVIGATING = (StaleElementReferenceException, WebDriverException)


def answer_in_browser(driver, db, reader: str, touch: bool = False) -> None:
    """Rate the image on screen as ``reader`` would, by keyboard (or by tapping on a phone), and wait for the next."""
    # The page has loaded (its key handlers are attached) and its image has arrived.
    current = WebDriverWait(driver, 60, ignored_exceptions=NAVIGATING).until(lambda d: d.execute_script(ITEM_ON_SCREEN))
    item, truth = truth_of(db, current)
    rating, guess = scripted_answer(reader, item, truth)
    if touch:
        driver.find_element(By.CSS_SELECTOR, f"input[name=rating][value='{rating}']").find_element(By.XPATH, "..").click()
        driver.find_element(By.CSS_SELECTOR, f"input[name=guess][value='{guess}']").find_element(By.XPATH, "..").click()
        driver.find_element(By.ID, "next").click()
    else:
        driver.find_element(By.TAG_NAME, "body").send_keys(str(rating), "r" if guess == "real" else "s", Keys.ENTER)
    WebDriverWait(driver, 60, ignored_exceptions=NAVIGATING).until(
        lambda d: d.execute_script("const f = document.querySelector('input[name=item]'); return f ? f.value : 'done';") != current)


def answer_quickly(url: str, link: str, db, acknowledged: list) -> None:
    """A reader's answers as fast as the server takes them (page, then answer), until it dies."""
    token = link.rsplit("/", 1)[1]
    try:
        with httpx.Client(timeout=10) as client:
            while True:
                page = client.get(link)
                if page.status_code != 200:
                    return
                current = re.search(r'name="item" value="([^"]+)"', page.text).group(1)
                item, truth = truth_of(db, current)
                rating, guess = scripted_answer("r2", item, truth)
                reply = client.post(f"{url}/r/{token}/answer", data={"item": current, "rating": rating, "guess": guess})
                if reply.status_code in (200, 303):  # followed to the next page: committed
                    acknowledged.append(item)
    except httpx.TransportError:
        return  # killed


def test_three_readers_rate_every_image_and_a_killed_server_loses_nothing(browser, phone, created, screenshots):
    server, links, db = created
    # r1, at a workstation, by keyboard, all the way.
    browser.get(links["r1"])
    assert "Image 1 of 12" in browser.find_element(By.ID, "progress-text").text
    shoot(browser, screenshots, "reader_study_item")
    for _ in range(IMAGES):
        answer_in_browser(browser, db, "r1")
    assert "All 12 images are rated" in browser.find_element(By.TAG_NAME, "body").text

    # r2 rates four in the browser, then answers in a burst; the server is SIGKILLed in the middle of
    # it and restarted: every answer the server acknowledged is in the file.
    browser.get(links["r2"])
    for _ in range(4):
        answer_in_browser(browser, db, "r2")
    acknowledged = []
    burst = threading.Thread(target=answer_quickly, args=(server.url, links["r2"], db, acknowledged), daemon=True)
    burst.start()
    while len(acknowledged) < 3 and burst.is_alive():
        time.sleep(0.005)
    server.kill()
    burst.join(30)
    server.start()
    r2 = {a[1] for a in answers(db) if a[0] == "r2"}
    assert len(acknowledged) >= 3 and set(acknowledged) <= r2 and len(r2) <= 4 + len(acknowledged) + 1
    browser.get(links["r2"])  # the same link resumes at the first unanswered image
    assert f"Image {len(r2) + 1} of 12" in browser.find_element(By.ID, "progress-text").text
    for _ in range(IMAGES - len(r2)):
        answer_in_browser(browser, db, "r2")

    # r3, on a phone, by tapping; one answer is submitted twice (and once more, changed): the first stands.
    phone.get(links["r3"])
    assert phone.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    shoot(phone, screenshots, "reader_study_phone")
    current = phone.find_element(By.NAME, "item").get_attribute("value")
    item, truth = truth_of(db, current)
    rating, guess = scripted_answer("r3", item, truth)
    token = links["r3"].rsplit("/", 1)[1]
    for r, g in ((rating, guess), (rating, guess), (6 - rating, "real" if guess == "synthetic" else "synthetic")):
        reply = httpx.post(f"{server.url}/r/{token}/answer", data={"item": current, "rating": r, "guess": g}, follow_redirects=False)
        assert reply.status_code == 303
    assert [a for a in answers(db) if a[0] == "r3"] == [("r3", item, rating, guess)]
    phone.refresh()
    for _ in range(IMAGES - 1):
        answer_in_browser(phone, db, "r3", touch=True)
    got = answers(db)
    assert len(got) == 3 * IMAGES and len({(a[0], a[1]) for a in got}) == 3 * IMAGES


def test_a_bad_or_used_up_link_gets_a_plain_403_and_readers_reach_nothing_else(browser, created):
    server, links, db = created
    for url, words in ((server.url + "/r/not-a-token", "not valid"), (links["r1"], "has been used"),
                       (links["r1"].replace("/r/", "/r/x"), "not valid")):
        reply = httpx.get(url)
        assert reply.status_code == 403 and words in reply.text, url
        browser.get(url)
        assert words in browser.find_element(By.ID, "error").text
    with sqlite3.connect(db) as con:
        public_id = con.execute("SELECT public_id FROM items LIMIT 1").fetchone()[0]
    token = links["r1"].rsplit("/", 1)[1]
    assert httpx.get(f"{server.url}/r/{token}/image/{public_id}.png").status_code == 403  # used up: no more images
    assert httpx.get(f"{server.url}/r/nobody/image/{public_id}.png").status_code == 403
    for path in ("/api/runs", "/runs", "/compare", "/docs", "/openapi.json"):  # the dashboard is not on this server
        assert httpx.get(server.url + path).status_code == 404, path
    assert httpx.get(links["r2"]).headers["referrer-policy"] == "no-referrer"


# ---- independent reference computations (formulas, not the libraries the app uses) ----

def cohen_quadratic(a: list[int], b: list[int], k: int = 5) -> float:
    o = np.zeros((k, k))
    for x, y in zip(a, b):
        o[x - 1, y - 1] += 1
    o /= o.sum()
    e = np.outer(o.sum(1), o.sum(0))
    w = np.array([[(i - j) ** 2 for j in range(k)] for i in range(k)]) / (k - 1) ** 2
    return 1 - (w * o).sum() / (w * e).sum()


def fleiss(matrix: np.ndarray) -> float:
    """matrix: readers x items of category values."""
    cats = np.unique(matrix)
    n, items = matrix.shape
    counts = np.array([[np.sum(matrix[:, i] == c) for c in cats] for i in range(items)])
    p = counts.sum(0) / (items * n)
    pi = ((counts ** 2).sum(1) - n) / (n * (n - 1))
    return (pi.mean() - (p ** 2).sum()) / (1 - (p ** 2).sum())


def krippendorff_ordinal(matrix: np.ndarray, values=(1, 2, 3, 4, 5)) -> float:
    idx = {v: i for i, v in enumerate(values)}
    o = np.zeros((len(values), len(values)))
    for unit in matrix.T:
        m = len(unit)
        for a, b in itertools.permutations(range(m), 2):
            o[idx[unit[a]], idx[unit[b]]] += 1 / (m - 1)
    nc = o.sum(1)
    d = np.array([[(sum(nc[min(c, k): max(c, k) + 1]) - (nc[c] + nc[k]) / 2) ** 2 for k in range(len(values))] for c in range(len(values))])
    total = nc.sum()
    return 1 - (total - 1) * (o * d).sum() / (np.outer(nc, nc) * d).sum()


def binomial_two_sided(k: int, n: int) -> float:
    probs = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
    return min(1.0, sum(p for p in probs if p <= probs[k] * (1 + 1e-7)))


def fisher_two_sided(table: list[list[int]]) -> float:
    (a, b), (c, d) = table
    rows, col, n = (a + b, c + d), a + c, a + b + c + d
    prob = {x: math.comb(rows[0], x) * math.comb(rows[1], col - x) / math.comb(n, col)
            for x in range(max(0, col - rows[1]), min(rows[0], col) + 1)}
    return min(1.0, sum(p for p in prob.values() if p <= prob[a] * (1 + 1e-7)))


def mann_whitney(x: list[float], y: list[float]) -> tuple[float, float]:
    u = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in x for b in y)
    n1, n2 = len(x), len(y)
    n = n1 + n2
    _, ties = np.unique(np.array(x + y), return_counts=True)
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - (ties ** 3 - ties).sum() / (n * (n - 1))))
    z = (abs(u - n1 * n2 / 2) - 0.5) / sigma
    return u, math.erfc(z / math.sqrt(2))


def test_the_results_match_independent_computations_and_appear_on_the_dashboard(browser, created, dashboard, tiny_finished_run,
                                                                                 screenshots):
    _, _, db = created
    subprocess.run([sys.executable, "-m", "simulations.cli", "reader-study", "results", str(db)], cwd=REPO, check=True,
                   capture_output=True)
    results = json.loads((db.parent / "results.json").read_text())
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT r.name, a.item_id, a.rating, a.guess, i.truth FROM answers a JOIN readers r ON r.id = a.reader_id "
                           "JOIN items i ON i.id = a.item_id ORDER BY a.item_id").fetchall()
    ratings = {r: [row[2] for row in rows if row[0] == r] for r in READERS}
    for name in READERS:
        mine = [row for row in rows if row[0] == name]
        correct = sum(row[3] == row[4] for row in mine)
        got = results["readers"][name]
        assert got["accuracy"] == pytest.approx(correct / IMAGES)
        assert got["binomial_p"] == pytest.approx(binomial_two_sided(correct, IMAGES))  # half the images are real
        table = [[sum(row[4] == t and row[3] == g for row in mine) for g in ("real", "synthetic")] for t in ("real", "synthetic")]
        assert got["fisher_p"] == pytest.approx(fisher_two_sided(table))
        assert got["balanced_accuracy"] == pytest.approx((table[0][0] / sum(table[0]) + table[1][1] / sum(table[1])) / 2)
        real = [row[2] for row in mine if row[4] == "real"]
        syn = [row[2] for row in mine if row[4] == "synthetic"]
        u, p = mann_whitney(real, syn)
        assert got["mann_whitney_u"] == pytest.approx(u) and got["mann_whitney_p"] == pytest.approx(p)
        assert got["auc_rating"] == pytest.approx(u / (len(real) * len(syn)))
    # Pooled over readers, image by image (mean rating, majority of three guesses).
    items = sorted({row[1] for row in rows})
    mean = {i: np.mean([row[2] for row in rows if row[1] == i]) for i in items}
    truth = {row[1]: row[4] for row in rows}
    majority = {i: "real" if sum(row[3] == "real" for row in rows if row[1] == i) >= 2 else "synthetic" for i in items}
    u, p = mann_whitney([mean[i] for i in items if truth[i] == "real"], [mean[i] for i in items if truth[i] == "synthetic"])
    pooled = results["pooled"]
    assert pooled["answers"] == IMAGES and pooled["mann_whitney_u"] == pytest.approx(u) and pooled["mann_whitney_p"] == pytest.approx(p)
    correct = sum(majority[i] == truth[i] for i in items)
    assert pooled["binomial_p"] == pytest.approx(binomial_two_sided(correct, IMAGES))
    agreement = results["agreement"]
    for a, b in itertools.combinations(READERS, 2):
        assert agreement["cohen_kappa_quadratic"][f"{a} vs {b}"] == pytest.approx(cohen_quadratic(ratings[a], ratings[b]))
    matrix = np.array([ratings[r] for r in READERS])
    assert agreement["fleiss_kappa_rating"] == pytest.approx(fleiss(matrix))
    assert agreement["krippendorff_alpha_ordinal"] == pytest.approx(krippendorff_ordinal(matrix))
    guesses = np.array([[row[3] == "real" for row in rows if row[0] == r] for r in READERS]).astype(int)
    assert agreement["fleiss_kappa_guess"] == pytest.approx(fleiss(guesses))
    # r1 and r2 tell real from synthetic by their ratings; a test that cannot tell them apart is broken.
    assert results["readers"]["r1"]["accuracy"] > 0.6 and results["readers"]["r3"]["auc_rating"] < results["readers"]["r1"]["auc_rating"]
    with sqlite3.connect(db) as con:
        shown = dict(con.execute("SELECT site, COUNT(*) FROM items WHERE truth = 'real' GROUP BY site").fetchall())
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert shown == results["real_images_by_site"] == {"hospital_a": IMAGES // 2}  # only the consenting site

    report = json.loads((db.parents[2] / "report.json").read_text())
    assert report["reader_studies"]["e2e"]["agreement"] == agreement  # added to the run's report
    browser.get(f"{dashboard.url}/runs/{db.parents[2].name}")
    browser.find_element(By.LINK_TEXT, "e2e").click()
    WebDriverWait(browser, 30).until(EC.presence_of_element_located((By.ID, "fleiss")))
    assert browser.find_element(By.ID, "fleiss").text == f"{agreement['fleiss_kappa_rating']:.4g}"
    shoot(browser, screenshots, "reader_study_results")
