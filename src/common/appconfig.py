"""Bridge between Flower's run config (``[tool.flwr.app.config]``) and fedsynth YAML.

In a deployment ``fedsynth launch`` ships the run's configuration itself, not a path: the
coordinator's YAML, loaded and resolved, as JSON (``config-json``) with its SHA-256
(``config-sha256``), so hospitals need no copy of the coordinator's files at the same
absolute paths; each node reads only its own site file, locally. Without ``config-json``
(``flwr run .`` on one machine) Flower carries the YAML's path and the profile name.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from .config import ConfigError, RunConfig, load_run, run_from_dict

REPO_ROOT = Path(__file__).resolve().parents[2]


def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (REPO_ROOT / p).resolve()


def ship_run(run: RunConfig) -> dict[str, str]:
    """The run config values that carry ``run`` to every node: its content and that content's hash."""
    body = json.dumps(run.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    return {"config-json": base64.b64encode(body).decode(), "config-sha256": hashlib.sha256(body).hexdigest()}


def shipped_run(cfg) -> RunConfig:
    """The run a coordinator shipped; refused (one line) when its content does not match its hash."""
    body = base64.b64decode(str(cfg["config-json"]).encode(), validate=True)
    if hashlib.sha256(body).hexdigest() != str(cfg.get("config-sha256", "")):
        raise ConfigError("run config: config-json does not match config-sha256 (altered in transit or by a tool)")
    return run_from_dict(json.loads(body))


def run_from_context(context) -> RunConfig:
    cfg = context.run_config
    if str(cfg.get("config-json", "") or ""):
        return shipped_run(cfg)
    return load_run(_resolve(str(cfg.get("config", "simulations/demo.yaml"))), str(cfg.get("profile", "quick")))


def run_dir_from_context(context, run: RunConfig) -> Path:
    given = str(context.run_config.get("run-dir", "") or "")
    return _resolve(given) if given else _resolve(run.output_dir) / run.name


def registry_from_context(context) -> dict[int, str]:
    """A deployment's node registry (node id -> site), written by ``fedsynth register``.

    Required: in a deployment the server must never take a node's word for which hospital it is.
    """
    given = str(context.run_config.get("node-registry", "") or "")
    if not given:
        raise ConfigError("run config: node-registry is not set; launch deployments with `fedsynth launch`, which "
                          "passes the registry `fedsynth register` writes (node identities are never self-reported)")
    return load_registry(_resolve(given))


def read_registry(path: Path) -> dict[str, dict]:
    """The registry's entries as written (node id string -> site, key hash, date); {} if none yet."""
    if not Path(path).exists():
        return {}
    try:
        return dict(json.loads(Path(path).read_text())["nodes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable node registry ({type(exc).__name__}); restore it from backup "
                          "or rerun `fedsynth register`") from None


def load_registry(path: Path) -> dict[int, str]:
    if not Path(path).exists():
        raise ConfigError(f"{path}: no node registry; register the hospitals' keys first (fedsynth register)")
    try:
        return {int(node_id): str(entry["site"]) for node_id, entry in read_registry(path).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a readable node registry ({type(exc).__name__}); rerun `fedsynth register`") from None
