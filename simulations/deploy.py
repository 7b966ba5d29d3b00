"""Real deployment: a SuperLink behind a Fleet-only gateway, and one SuperNode per hospital.

Thin wrappers over Flower's own commands that make the safe choice the default (threat model:
docs/deployment.md):

* coordinator: ``fedsynth certs`` (CA, TLS, release key), ``fedsynth server`` (the SuperLink on
  loopback, its Fleet API published by :mod:`server.fleet_gateway`), ``fedsynth register``
  (binds each hospital's public key to its site in the node registry), ``fedsynth launch``
  (``flwr run`` with the run's configuration shipped as content, hashed, and the registry);
* hospital: ``fedsynth keygen`` (its own key pair; only the .pub leaves), ``fedsynth client``
  (a SuperNode that runs only allowlisted apps, with a local state folder for its ledger);
* all of it on one machine: :class:`LocalFederation` (``fedsynth deploy-local``, the tests).

TLS with the federation's CA and SuperNode authentication are on unless ``insecure=True``,
which warns loudly.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

from client.checks import check_source
from client.node_exec import ALLOWLIST_FILE, app_hash, read_allowlist
from common.appconfig import REPO_ROOT, read_registry, ship_run
from common.config import ConfigError, RunConfig, load_run, load_site
from common.runtime import sha256_file
from common.security.certs import keygen, make_certs

DEFAULT_PORT = 8000
REGISTRY = "node_registry.json"


def _bin(name: str) -> str:
    """Flower's executables from this environment, even when the venv is not on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _env(flwr_home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # never pull a CUDA torch at run time
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def warn_insecure(what: str) -> None:
    msg = f"INSECURE {what}: no TLS and no node authentication. Use only on a closed test network."
    warnings.warn(msg, UserWarning, stacklevel=3)
    print(f"WARNING: {msg}", file=sys.stderr)


# ------------------------------------------------------------------ coordinator
def superlink_command(certs: Path | None, internal_port: int, state: Path, insecure: bool = False) -> list[str]:
    """The SuperLink, on loopback only: its Control and Runtime APIs never face the network."""
    cmd = [_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(internal_port), "--database", str(state / "superlink.db"),
           "--disable-runtime-dependency-installation"]
    if insecure:
        warn_insecure("SuperLink")
        return cmd + ["--insecure"]
    certs = Path(certs)
    return cmd + ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "superlink.crt"),
                  "--ssl-keyfile", str(certs / "superlink.key"), "--enable-supernode-auth"]


def gateway_command(certs: Path | None, host: str, port: int, internal_port: int, insecure: bool = False) -> list[str]:
    """What the hospitals connect to: the Fleet API alone (server.fleet_gateway)."""
    cmd = [sys.executable, "-m", "server.fleet_gateway", "--listen", f"{host}:{port}", "--upstream", f"127.0.0.1:{internal_port}"]
    return cmd + (["--insecure"] if insecure else ["--certs", str(Path(certs))])


def write_connection(flwr_home: Path, superlink: str, certs: Path | None, insecure: bool = False) -> Path:
    """The coordinator's Flower connection ``fedsynth`` (to the loopback SuperLink) used by register and launch."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", 'default = "fedsynth"', "", "[superlink.fedsynth]", f'address = "{superlink}"']
    lines.append("insecure = true" if insecure else f'root-certificates = "{(Path(certs) / "ca.crt").resolve()}"')
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def register_node(site: str, public_key: Path, registry: Path, flwr_home: Path | None) -> int:
    """Register a hospital's public key with the SuperLink and bind its node id to ``site`` in
    ``registry``: the server counts a node's replies for that site only, whatever the node says."""
    nodes = read_registry(registry)
    if (bound := [n for n, e in nodes.items() if e["site"] == site]):
        raise ConfigError(f"{registry}: site {site} is already registered as node {bound[0]}; "
                          f"`fedsynth unregister {site}` first to bind a new key")
    res = run([_bin("flwr"), "supernode", "register", str(public_key), "fedsynth", "--name", site, "--format", "json"], flwr_home, timeout=120)
    try:
        node_id = int(json.loads(res.stdout)["node-id"])
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"registering {site} ({public_key}) failed: {(res.stdout + res.stderr).strip()[-500:]}") from None
    nodes[str(node_id)] = {"site": site, "public_key_sha256": sha256_file(Path(public_key)),
                           "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_registry(registry, nodes)
    return node_id


def unregister_node(site: str, registry: Path, flwr_home: Path | None) -> int:
    """Unregister ``site``'s node from the SuperLink and remove its binding (to rotate or revoke its key)."""
    nodes = read_registry(registry)
    bound = [n for n, e in nodes.items() if e["site"] == site]
    if not bound:
        raise ConfigError(f"{registry}: no node is registered for site {site}")
    res = run([_bin("flwr"), "supernode", "unregister", bound[0], "fedsynth"], flwr_home, timeout=120)
    if res.returncode != 0 and "not found" not in (res.stdout + res.stderr).lower():
        raise RuntimeError(f"unregistering {site} (node {bound[0]}) failed: {(res.stdout + res.stderr).strip()[-500:]}")
    del nodes[bound[0]]
    _write_registry(registry, nodes)
    return int(bound[0])


def _write_registry(path: Path, nodes: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"nodes": nodes}, indent=2) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def launch_command(run: RunConfig, run_dir: Path, registry: Path, app: Path = REPO_ROOT,
                   superlink: str = "fedsynth", **run_config: str) -> list[str]:
    """``flwr run`` of ``app`` (fedsynth unless a test app is given): the run's configuration travels
    as content with its hash, so hospitals need none of the coordinator's files."""
    values = {**ship_run(run), "run-dir": Path(run_dir).resolve(), "profile": run.profile,
              "node-registry": Path(registry).resolve(), **run_config}
    for key, value in values.items():
        _quotable(Path(str(value)), f"run config {key}")
    overrides = " ".join(f"{k}='{v}'" for k, v in values.items())
    return [_bin("flwr"), "run", str(app), superlink, "--run-config", overrides, "--stream"]


# ------------------------------------------------------------------ hospital
def node_state(site_yaml: Path, state_dir: Path | None) -> Path:
    """The node's local state folder (ledger, key, allowlist): required, never under a run folder."""
    site = load_site(site_yaml)
    given = state_dir or (site.state_dir and Path(site.origin).parent / site.state_dir)
    if not given:
        raise ConfigError(f"{site_yaml}: no state folder for this node; pass --state-dir or set state_dir in the site "
                          "file (the privacy ledger lives there, across every run)")
    path = Path(given).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    _quotable(path, "state folder")
    return path


SUPEREXEC_SECRET = "superexec.secret"


def superexec_secret(state: Path) -> Path:
    """A node-local secret shared by the SuperNode and its launcher (0600): without it, any process
    on the hospital's machine could take the node's tasks from its loopback API and run any app."""
    path = state / SUPEREXEC_SECRET
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path


def _quotable(path: Path, what: str) -> None:
    """Flower's key='value' config strings cannot carry a quote: refuse rather than mis-parse."""
    if any(c in str(path) for c in "'\"\n"):
        raise ConfigError(f"{path}: the {what}'s path may not contain quotes or newlines")


def allow_installed_app(state: Path, apps: list[Path] = (REPO_ROOT,)) -> Path:
    """The node's allowlist, with the hash of each app in ``apps`` (the fedsynth it installed) added."""
    path = state / ALLOWLIST_FILE
    known = read_allowlist(path) if path.exists() else set()
    lines = [] if path.exists() else ["# Apps this node runs (SHA-256 of the FAB; `fedsynth app-hash DIR` prints one)."]
    for app in apps:
        if (h := app_hash(app)) not in known:
            lines.append(f"{h}  # {Path(app).resolve().name}, added {datetime.now(timezone.utc):%Y-%m-%d}")
    if lines:
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")
    return path


def node_commands(site_yaml: Path, superlink: str, ca_cert: Path | None, state: Path, runtime_port: int,
                  key: Path | None = None, insecure: bool = False) -> tuple[list[str], list[str]]:
    """A hospital's SuperNode (process isolation: it runs no app itself) and the launcher that runs
    only allowlisted apps (client.node_exec). ``state`` keeps its ledger across runs."""
    site = load_site(site_yaml)  # fails early, naming the file, on a bad site YAML
    check_source(site)  # and on missing data, before anything connects
    _quotable(Path(site.origin).resolve(), "site file")
    node_config = f"site-config='{Path(site.origin).resolve()}' state-dir='{state}'"
    secret = str(superexec_secret(state))
    node = [_bin("flower-supernode"), "--superlink", superlink, "--port", str(runtime_port), "--node-config", node_config,
            "--isolation", "process", "--superexec-auth-secret-file", secret]
    launcher = [sys.executable, "-m", "client.node_exec", "--allowlist", str(state / ALLOWLIST_FILE),
                "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--insecure",  # the node's own loopback API
                "--superexec-auth-secret-file", secret]
    if insecure:
        warn_insecure(f"SuperNode {site.name}")
        return node + ["--insecure"], launcher
    key = Path(key) if key else state / f"{site.name}.key"
    if not key.exists():
        raise ConfigError(f"{key}: no key pair for site {site.name}; run `fedsynth keygen --site {site_yaml}` and send "
                          "the .pub to the coordinator")
    return node + ["--root-certificates", str(ca_cert), "--auth-supernode-private-key", str(key)], launcher


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
    """The whole deployment on 127.0.0.1: a SuperLink on loopback behind the Fleet gateway (TLS,
    node authentication), and per site YAML a SuperNode with its allowlisting launcher, its own
    key pair (``keygen`` in its state folder) and its registry binding: ``fedsynth deploy-local``
    and the deployment tests. Every process has its own process group and is stopped by it.
    ``apps``: the apps the nodes allow (fedsynth itself by default)."""

    def __init__(self, tmp: Path, sites: list[Path], apps: list[Path] = (REPO_ROOT,)):
        self.tmp, self.sites = tmp, {load_site(s).name: s for s in sites}
        self.certs, self.home = tmp / "certs", tmp / "flwr"
        make_certs(self.certs, release_key=False)  # releases are signed with the deployment's key (synthesis.signing_key)
        self.apps = list(apps)
        self.port, self.internal_port = free_port(), free_port()
        self.superlink = f"127.0.0.1:{self.port}"  # the gateway: what hospitals see
        self.registry = tmp / REGISTRY
        write_connection(self.home, f"127.0.0.1:{self.internal_port}", self.certs)
        self.server: list[subprocess.Popen] = []
        self.nodes: dict[str, list[subprocess.Popen]] = {}
        self.runtime_ports: dict[str, int] = {}  # each node's own loopback API

    def state(self, site: str) -> Path:
        return node_state(self.sites[site], self.tmp / "state" / site)

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return run(["flwr", *args], self.home, timeout=timeout)

    def start_superlink(self) -> None:
        self.server = [start(superlink_command(self.certs, self.internal_port, self.tmp), self.tmp / "superlink.log", self.home),
                       start(gateway_command(self.certs, "127.0.0.1", self.port, self.internal_port), self.tmp / "gateway.log", self.home)]
        def up() -> bool:
            if (dead := [p.args[0] for p in self.server if p.poll() is not None]):
                raise RuntimeError(f"{dead} exited; see {self.tmp / 'superlink.log'} and {self.tmp / 'gateway.log'}")
            return self.flwr("supernode", "list", "fedsynth", timeout=30).returncode == 0

        wait_for(up, 60, "SuperLink did not come up")

    def register(self) -> None:
        for site in self.sites:
            _, pub = keygen(site, self.state(site))  # each hospital makes its own; only the .pub comes here
            if site not in {e["site"] for e in read_registry(self.registry).values()}:
                register_node(site, pub, self.registry, self.home)

    def start_node(self, site: str) -> None:
        state = self.state(site)
        allow_installed_app(state, self.apps)
        self.runtime_ports[site] = free_port()
        node, launcher = node_commands(self.sites[site], self.superlink, self.certs / "ca.crt", state, self.runtime_ports[site])
        log = self.tmp / f"node-{site}.log"
        self.nodes[site] = [start(node, log, self.home), start(launcher, log, self.home)]

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
        """A crash: SIGKILL the node, its launcher and the ClientApp it spawned, no goodbye to the SuperLink."""
        for p in self.nodes.pop(site):
            stop(p, signal.SIGKILL)

    def kill_superlink(self) -> None:
        for p in self.server:
            stop(p, signal.SIGKILL)
        self.server = []

    def launch(self, config: Path, run_dir: Path, log: str = "launch.log", profile: str = "quick", app: Path = REPO_ROOT,
               **run_config) -> subprocess.Popen:
        cmd = launch_command(load_run(config, profile), run_dir, self.registry, app=app, **run_config)
        return start(cmd, self.tmp / log, self.home)

    def node_log(self, site: str) -> str:
        return (self.tmp / f"node-{site}.log").read_text(errors="replace")

    def down(self) -> None:
        for p in [*(p for procs in self.nodes.values() for p in procs), *self.server]:
            stop(p)
        self.nodes, self.server = {}, []


def supervise(cmds: list[list[str]], flwr_home: Path | None = None) -> int:
    """Run processes that belong together (SuperLink + gateway, SuperNode + launcher) in the
    foreground: when one exits, or on Ctrl-C / SIGTERM, all are stopped. Returns the first exit code."""
    procs = [subprocess.Popen(c, env=_env(flwr_home), start_new_session=True) for c in cmds]
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return next(p.returncode for p in procs if p.returncode is not None)
    except KeyboardInterrupt:
        return 130
    finally:
        for p in procs:
            stop(p)


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
        proc = start(launch_command(run, run_dir, fed.registry), fed.tmp / "launch.log", fed.home)
        if (rc := follow(proc, fed.tmp / "launch.log")) != 0:
            raise RuntimeError(f"flwr run exited with {rc}; logs in {fed.tmp}")
    finally:
        fed.down()
