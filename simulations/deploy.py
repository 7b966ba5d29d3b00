"""Real deployment: a SuperLink and one SuperNode per hospital, as separate processes.

Thin wrappers over Flower's own commands that make the safe choice the default:
TLS with the federation's CA (``fedsynth certs``) and SuperNode authentication
are on unless ``insecure=True``, which warns loudly.

* coordinator: ``fedsynth server`` (SuperLink), ``fedsynth register`` (site public keys),
  ``fedsynth launch`` (a run: ``flwr run`` with the YAML path as run config);
* hospital: ``fedsynth client --site sites/<site>.yaml --superlink HOST:PORT``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from common.appconfig import REPO_ROOT
from common.config import load_site

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


def client_command(site_yaml: Path, superlink: str, certs: Path | None, port: int, insecure: bool = False) -> list[str]:
    site = load_site(site_yaml)  # fails early, naming the file, on a bad site YAML
    cmd = [_bin("flower-supernode"), "--superlink", superlink, "--port", str(port),
           "--node-config", f"site-config='{Path(site.origin).resolve()}'"]
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


def launch_command(config: Path, run_dir: Path, profile: str = "quick") -> list[str]:
    run_config = f"config='{Path(config).resolve()}' run-dir='{Path(run_dir).resolve()}' profile='{profile}'"
    return [_bin("flwr"), "run", str(REPO_ROOT), "fedsynth", "--run-config", run_config, "--stream"]


def start(cmd: list[str], log: Path, flwr_home: Path | None = None) -> subprocess.Popen:
    """Start a long-running Flower process in its own process group, logging to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=_env(flwr_home), start_new_session=True)


def run(cmd: list[str], flwr_home: Path | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(flwr_home), capture_output=True, text=True, timeout=timeout)
