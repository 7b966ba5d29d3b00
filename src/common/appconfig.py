"""Bridge between Flower's run config (``[tool.flwr.app.config]``) and fedsynth YAML.

Flower carries only the YAML's path and the profile name; the YAML stays the
single source of truth for everything else.
"""

from __future__ import annotations

from pathlib import Path

from .config import RunConfig, load_run

REPO_ROOT = Path(__file__).resolve().parents[2]


def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (REPO_ROOT / p).resolve()


def run_from_context(context) -> RunConfig:
    cfg = context.run_config
    return load_run(_resolve(str(cfg.get("config", "simulations/demo.yaml"))), str(cfg.get("profile", "quick")))


def run_dir_from_context(context, run: RunConfig) -> Path:
    given = str(context.run_config.get("run-dir", "") or "")
    return _resolve(given) if given else _resolve(run.output_dir) / run.name
