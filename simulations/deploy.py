"""Real deployment: a SuperLink and one SuperNode per hospital, as separate processes.

Thin wrappers over Flower's own commands that make the safe choice the default:
TLS with the federation's CA (``fedsynth certs``) and SuperNode authentication
are on unless ``insecure=True``, which warns loudly.

* coordinator: ``fedsynth server`` (SuperLink), ``fedsynth register`` (site public keys),
  ``fedsynth launch`` (a run: ``flwr run`` with the YAML path as run config);
* hospital: ``fedsynth client --site sites/<site>.yaml --superlink HOST:PORT``;
* all of it on one machine: :class:`LocalFederation` (``fedsynth deploy-local``, the tests).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

from common.appconfig import REPO_ROOT
from common.config import RunConfig, load_site, site_state_dir
from common.security.certs import make_certs

DEFAULT_PORT = 8000


def _bin(name: str) -> str:
    """Flower's executables from this environment, even when the venv is not on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _env(flwr_home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # never pull a CUDA torch at run time
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def warn_insecure(what: str) -> None:
    msg = f"INSECURE {what}: no TLS and no node authentication. Use only on a closed test network."
    warnings.warn(msg, UserWarning, stacklevel=3)
    print(f"WARNING: {msg}", file=sys.stderr)


def server_command(certs: Path | None, host: str, port: int, state: Path, insecure: bool = False) -> list[str]:
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port), "--database", str(state / "superlink.db"),
           "--disable-runtime-dependency-installation"]
    if insecure:
        warn_insecure("SuperLink")
        return cmd + ["--insecure"]
    certs = Path(certs)
    return cmd + ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "superlink.crt"),
                  "--ssl-keyfile", str(certs / "superlink.key"), "--enable-supernode-auth"]


def client_command(site_yaml: Path, superlink: str, certs: Path | None, port: int, insecure: bool = False,
                   state_dir: Path | None = None) -> list[str]:
    """A hospital's SuperNode. ``state_dir`` (default: the site's own state folder) keeps its
    privacy ledger across runs: the ε budget is the site's, not one run's."""
    site = load_site(site_yaml)  # fails early, naming the file, on a bad site YAML
    state = Path(state_dir or site_state_dir(site)).expanduser().resolve()
    node_config = f"site-config='{Path(site.origin).resolve()}' state-dir='{state}'"
    cmd = [_bin("flower-supernode"), "--superlink", superlink, "--port", str(port), "--node-config", node_config]
    if insecure:
        warn_insecure(f"SuperNode {site.name}")
        return cmd + ["--insecure"]
    certs = Path(certs)
    key = certs / "sites" / f"{site.name}.key"
    if not key.exists():
        raise FileNotFoundError(f"{key}: no key pair for site {site.name}; run `fedsynth certs --sites {site_yaml}`")
    return cmd + ["--root-certificates", str(certs / "ca.crt"), "--auth-supernode-private-key", str(key)]


def write_connection(flwr_home: Path, superlink: str, certs: Path | None, insecure: bool = False) -> Path:
    """The coordinator's Flower connection ``fedsynth`` used by register and launch."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", 'default = "fedsynth"', "", "[superlink.fedsynth]", f'address = "{superlink}"']
    lines.append("insecure = true" if insecure else f'root-certificates = "{(Path(certs) / "ca.crt").resolve()}"')
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def register_commands(certs: Path, sites: list[Path]) -> list[list[str]]:
    return [[_bin("flwr"), "supernode", "register", str(Path(certs) / "sites" / f"{load_site(s).name}.pub"), "fedsynth"] for s in sites]


def launch_command(config: Path, run_dir: Path, profile: str = "quick", app: Path = REPO_ROOT, **run_config: str) -> list[str]:
    """``flwr run`` of ``app`` (fedsynth itself unless a test app is given) with the YAML as run config."""
    values = {"config": Path(config).resolve(), "run-dir": Path(run_dir).resolve(), "profile": profile, **run_config}
    overrides = " ".join(f"{k}='{v}'" for k, v in values.items())
    return [_bin("flwr"), "run", str(app), "fedsynth", "--run-config", overrides, "--stream"]


def start(cmd: list[str], log: Path, flwr_home: Path | None = None) -> subprocess.Popen:
    """Start a long-running Flower process in its own process group, logging to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=_env(flwr_home), start_new_session=True)


def run(cmd: list[str], flwr_home: Path | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(flwr_home), capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------ a federation on one machine
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(1)
    raise TimeoutError(what)


def stop(p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop ``p`` and everything it spawned (its process group); SIGKILL after 20 s."""
    try:
        os.killpg(p.pid, sig)
        p.wait(timeout=20)
    except ProcessLookupError:
        p.poll()  # already gone: reap it
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


class LocalFederation:
    """One SuperLink (TLS, node authentication) and one SuperNode per site YAML, all on
    127.0.0.1: ``fedsynth deploy-local`` and the deployment tests. Every process is started in its
    own process group and stopped by pid group, with the apps Flower spawns."""

    def __init__(self, tmp: Path, sites: list[Path]):
        self.tmp, self.sites = tmp, {load_site(s).name: s for s in sites}
        self.certs, self.home = tmp / "certs", tmp / "flwr"
        make_certs(self.certs, list(self.sites), ["localhost", "127.0.0.1"])
        self.port = free_port()
        self.superlink = f"127.0.0.1:{self.port}"
        write_connection(self.home, self.superlink, self.certs)
        self.server: subprocess.Popen | None = None
        self.nodes: dict[str, subprocess.Popen] = {}

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return run(["flwr", *args], self.home, timeout=timeout)

    def start_superlink(self) -> None:
        cmd = server_command(self.certs, "127.0.0.1", self.port, self.tmp)
        self.server = start(cmd, self.tmp / "superlink.log", self.home)
        wait_for(lambda: self.flwr("supernode", "list", "fedsynth", timeout=30).returncode == 0, 60, "SuperLink did not come up")

    def register(self) -> None:
        for cmd in register_commands(self.certs, list(self.sites.values())):
            res = run(cmd, self.home, timeout=60)
            if res.returncode != 0 and "already" not in (res.stdout + res.stderr).lower():
                raise RuntimeError(f"registering {cmd[-2]} failed: {res.stdout}{res.stderr}")

    def start_node(self, site: str) -> None:
        cmd = client_command(self.sites[site], self.superlink, self.certs, free_port(), state_dir=self.tmp / "state" / site)
        self.nodes[site] = start(cmd, self.tmp / f"node-{site}.log", self.home)

    def online(self) -> int:
        return self.flwr("supernode", "list", "fedsynth", timeout=30).stdout.count("online")

    def wait_online(self, n: int, timeout: float = 90) -> None:
        wait_for(lambda: self.online() >= n, timeout, f"{n} SuperNodes did not come online")

    def up(self) -> LocalFederation:
        self.start_superlink()
        self.register()
        for site in self.sites:
            self.start_node(site)
        self.wait_online(len(self.sites))
        return self

    def kill(self, site: str) -> None:
        """A crash: SIGKILL the node and the ClientApp it spawned, no goodbye to the SuperLink."""
        stop(self.nodes.pop(site), signal.SIGKILL)

    def kill_superlink(self) -> None:
        stop(self.server, signal.SIGKILL)
        self.server = None

    def launch(self, config: Path, run_dir: Path, log: str = "launch.log", **run_config) -> subprocess.Popen:
        return start(launch_command(config, run_dir, **run_config), self.tmp / log, self.home)

    def node_log(self, site: str) -> str:
        return (self.tmp / f"node-{site}.log").read_text(errors="replace")

    def down(self) -> None:
        for p in [*self.nodes.values(), *([self.server] if self.server else [])]:
            stop(p)
        self.nodes, self.server = {}, None


def follow(proc: subprocess.Popen, log: Path) -> int:
    """Print ``log`` as ``proc`` writes it (Flower's round-by-round progress); return its exit code."""
    with open(log, errors="replace") as f:  # from the start: nothing the launch wrote is skipped
        while True:
            line = f.readline()
            if line:
                print(line, end="", flush=True)
            elif proc.poll() is not None:
                print(f.read(), end="", flush=True)
                return proc.returncode
            else:
                time.sleep(0.5)


def run_local_deployment(run: RunConfig, run_dir: Path) -> None:
    """The whole federation as real processes on this machine (``fedsynth deploy-local``).

    One SuperLink and one SuperNode per site, the external hospital's included (it only
    evaluates), with TLS and node authentication; certificates, logs and each node's
    privacy ledger go to ``run_dir/deployment`` (a fresh budget per local run).
    """
    fed = LocalFederation(Path(run_dir) / "deployment", [Path(s.origin) for s in run.sites])
    try:
        fed.up()
        proc = fed.launch(Path(run.origin), run_dir, profile=run.profile)
        if (rc := follow(proc, fed.tmp / "launch.log")) != 0:
            raise RuntimeError(f"flwr run exited with {rc}; logs in {fed.tmp}")
    finally:
        fed.down()
