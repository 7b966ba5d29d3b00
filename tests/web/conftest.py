"""Browser tests: the dashboard and the reader app as real server processes, driven by Debian's
headless chromium through Selenium. Screenshots go to $FEDSYNTH_SCREENSHOTS (docs/img via
`make screenshots`), else to a temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ..conftest import REPO

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`fedsynth <args> --port P` as a process on 127.0.0.1; kill() is a SIGKILL, not a shutdown."""

    def __init__(self, args: list[str], log: Path):
        self.args, self.log, self.port, self.proc = args, log, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", *self.args, "--port", str(self.port)],
                                     cwd=REPO, env=env, stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log}:\n{self.log.read_text()[-2000:]}")
            try:
                httpx.get(self.url + "/", timeout=1)
                return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not start; see {self.log}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def _driver(mobile: bool = False):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("browser tests need Debian's chromium and chromium-driver: "
                    "apt-get update && apt-get install -y chromium chromium-driver (make browser does it)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars"):
        opts.add_argument(arg)
    if mobile:  # a phone: narrow, touch, high density
        opts.add_experimental_option("mobileEmulation", {"deviceMetrics": {"width": 393, "height": 851, "pixelRatio": 2.75, "touch": True}})
    else:
        opts.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    return driver


@pytest.fixture(scope="session")
def browser():
    driver = _driver()
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def phone():
    driver = _driver(mobile=True)
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("FEDSYNTH_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def shoot(driver, folder: Path, name: str, full: bool = True) -> Path:
    """A screenshot of the page; ``full``: all of it (the window grows to the page's height first)."""
    if full:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(driver.get_window_size()["width"], min(max(height + 140, 600), 4000))
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


@pytest.fixture(scope="session")
def runs_root(tiny_finished_run, tmp_path_factory) -> Path:
    """A runs/ folder as a coordinator has it: the finished simulation, the same release seen as a
    deployment, a run still in progress, and a half-written one."""
    root = tmp_path_factory.mktemp("dashboard_runs")
    sim = root / tiny_finished_run.name
    shutil.copytree(tiny_finished_run, sim, ignore=shutil.ignore_patterns("*.pt"))
    dep = root / "tiny-deployment"
    shutil.copytree(sim, dep)
    (dep / "deployment").mkdir()
    live = root / "tiny-live"
    live.mkdir()
    shutil.copy(sim / "config.json", live / "config.json")
    (live / "run_status.json").write_text(json.dumps({"state": "running", "mode": "simulate", "pid": os.getpid(),
                                                          "host": socket.gethostname(), "updated": time.time()}))
    compare = root / "tiny-compare"  # `fedsynth compare`: its report, and one run folder per generator
    compare.mkdir()
    (compare / "report.json").write_text(json.dumps({"rows": []}))
    shutil.copytree(sim, compare / "ddpm")
    broken = root / "tiny-broken"
    broken.mkdir()
    (broken / "config.json").write_text((sim / "config.json").read_text()[:200])  # killed mid-write
    (broken / "report.json").write_text('{"headline": {"fup": 4')
    return root


@pytest.fixture(scope="session")
def dashboard(runs_root, tmp_path_factory, signing_key):
    server = Server(["dashboard", str(runs_root), "--public-key", str(signing_key.with_suffix(".pub"))],
                    tmp_path_factory.mktemp("dashboard_log") / "dashboard.log").start()
    yield server
    server.stop()
