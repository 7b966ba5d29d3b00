"""``fedsynth simulate``: every training site as a simulated SuperNode on this machine.

Runs the same ServerApp and ClientApp as a deployment, in Flower's simulation
engine, then scores the release and writes the reports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from common.config import RunConfig, load_run, run_from_dict
from common.evaluation.gate import ReleaseRefused
from common.reporting import write_reports
from common.reporting.run_folder import write_status
from common.runtime import versions, write_json
from server.synthesis import release_dir

from .terminal import LOG, console, output_to_log, warn

DASHBOARD = "http://127.0.0.1:8050"  # `fedsynth dashboard`'s default address


def _eps(e: float | None) -> str:
    return "inf (no DP)" if e is None else f"{e:.2f}"


def _eps_line(eps: dict[str, float | None], limit: int = 6) -> str:
    """Per site; with many sites, the largest and how many trained (the report lists them all)."""
    if len(eps) <= limit:
        return ", ".join(f"{s}={_eps(e)}" for s, e in eps.items())
    if any(e is None for e in eps.values()):
        return f"inf (no DP) at {sum(e is None for e in eps.values())} of {len(eps)} sites"
    worst = max(eps, key=lambda s: eps[s])
    return f"max {worst}={_eps(eps[worst])}; {sum(e > 0 for e in eps.values())} of {len(eps)} sites trained"


def new_run_dir(run: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(run.output_dir).expanduser().resolve()
    path = base / f"{run.name}-{stamp}"
    i = 1
    while path.exists():
        path, i = base / f"{run.name}-{stamp}-{i}", i + 1
    return path


def run_federation(run: RunConfig, run_dir: Path) -> None:
    # Imported here: Flower and Ray are heavy and not needed by `fedsynth --help`.
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from server.server_app import make_server_app

    # Flower would otherwise install the app's dependencies (a CUDA torch) at run time.
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Opacus calls logging.basicConfig() on import; keep Flower's lines from printing twice.
    logging.getLogger("flwr").propagate = False
    fed = run.federation
    backend_config = {
        "client_resources": {"num_cpus": fed.num_cpus_per_client, "num_gpus": fed.num_gpus_per_client},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "logging_level": logging.ERROR},
    }
    if (address := fed.ray_address or os.environ.get("RAY_ADDRESS")):
        connect_ray_cluster(address)  # Flower then uses this connection instead of starting Ray
    run_simulation(
        server_app=make_server_app(lambda _ctx: run, lambda _ctx, _run: run_dir),
        client_app=make_client_app(lambda _ctx: run, simulation=True),
        num_supernodes=len(run.training_sites),
        backend_config=backend_config,
    )


# What a worker of an existing cluster needs from this driver: it inherits the environment of
# its own `ray start`, not ours.
RAY_WORKER_ENV = ("FEDSYNTH_DATA_DIR", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "RAY_DEDUP_LOGS")


def connect_ray_cluster(address: str) -> dict:
    """Join an existing Ray cluster (``ray start --head`` elsewhere) as the simulation's driver.

    Its size is the cluster's, not this machine's: Flower makes one actor per
    ``num_cpus_per_client`` CPUs of each node. Workers get this checkout on their PYTHONPATH
    and the data location from here; the code, Python and Ray versions and the data paths must
    be the same on every node (docs/scaling.md). Returns the cluster's resources."""
    import sys

    import ray

    env = {k: os.environ[k] for k in RAY_WORKER_ENV if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=address, runtime_env={"env_vars": env}, include_dashboard=False, logging_level=logging.ERROR)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
    resources = {"address": address, "nodes": len(nodes), "cpus": sum(n["Resources"].get("CPU", 0) for n in nodes),
                 "gpus": sum(n["Resources"].get("GPU", 0) for n in nodes)}
    logging.getLogger("fedsynth").info("Ray cluster %s: %d node(s), %g CPU(s), %g GPU(s)", address, resources["nodes"],
                                       resources["cpus"], resources["gpus"])
    return resources


def evaluate_run(run: RunConfig, run_dir: Path, wall_start: float | None = None) -> dict:
    """Score the release in ``run_dir`` and write report.json / report.html."""
    from .evaluate import evaluate_release

    metrics, previews = evaluate_release(run, run_dir)
    history = json.loads((run_dir / "history.json").read_text())
    # A simulation's researcher holds the sites' state folders: their local logs feed the loss plot.
    history["local"] = {p.parent.name: json.loads(p.read_text()) for p in sorted((run_dir / "clients").glob("*/local_log.json"))}
    report = {
        "run": {
            "name": run.name,
            "profile": run.profile,
            "seed": run.seed,
            "rounds": run.training.rounds,
            "run_dir": str(run_dir),
            "wall_time_s": time.time() - wall_start if wall_start else None,  # None: evaluation only
            "config": run.to_dict(),
            "versions": versions(),
        },
        **metrics,
        # The round-0 model's public data (name, hash, counts), or None when training started from noise.
        "public_prior": json.loads(prior.read_text()) if (prior := run_dir / "public_prior.json").exists() else None,
        "federation": {"history": history},
    }
    write_reports(report, previews, history, run_dir)
    return report


def simulate_run(run: RunConfig, run_dir: Path, federate: Callable[[RunConfig, Path], None] = run_federation) -> dict:
    """Federate, synthesise and evaluate one configured run into ``run_dir``; returns the report.

    ``federate`` runs the federation: Flower's simulation engine by default, or real
    processes (:func:`simulations.deploy.run_local_deployment`)."""
    from client.checks import preflight
    from server.synthesis import signing_key_path

    start = time.time()
    # Fail in the first seconds, not after the federation: every site's data, and where the release key lives.
    preflight(run)
    signing_key_path(run, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", run.to_dict())
    how = "simulate" if federate is run_federation else "deploy-local"
    console.rule(f"[bold]fedsynth {how}[/] {run.name} ({run.profile}, {run.model.name}, dp={run.training.dp}) -> {run_dir}")
    write_status(run_dir, "running", mode=how)
    try:
        with output_to_log(run_dir / LOG):
            report = _train_and_score(run, run_dir, federate, start)
    except ReleaseRefused:  # the run is done; its release is not: gate.json says why
        write_status(run_dir, "finished", release="refused")
        _dashboard_link(run_dir)
        raise
    except Exception as exc:  # Ctrl-C is left "running": a dead pid reads as interrupted, resumable
        write_status(run_dir, "failed", error=(str(exc).strip().splitlines() or [type(exc).__name__])[0])
        console.print(f"[red]Stopped.[/] This run's log (library output, the traceback): {run_dir / LOG}", soft_wrap=True)
        raise
    if report:
        write_status(run_dir, "finished")
        _dashboard_link(run_dir)
    return report


def _dashboard_link(run_dir: Path) -> None:
    console.print(f"Dashboard: fedsynth dashboard {run_dir.parent}  ->  {DASHBOARD}/runs/{quote(run_dir.name)}", soft_wrap=True)


def _train_and_score(run: RunConfig, run_dir: Path, federate: Callable[[RunConfig, Path], None], start: float) -> dict:
    from .progress import FederationProgress, config_warnings, phase

    for message in config_warnings(run):
        warn(message)
    console.print(f"[1/2] Federated training: {len(run.training_sites)} sites x {run.training.rounds} rounds x "
                  f"{run.training.local_steps} steps, then sampling (library output: {run_dir / LOG})", soft_wrap=True)
    with FederationProgress(run, run_dir):
        federate(run, run_dir)
    if not (release_dir(run_dir) / "synthetic.npz").exists():
        stop = run.federation.stop_after_round
        if not stop or stop >= run.training.rounds:
            raise RuntimeError(f"federation finished without a synthetic release in {run_dir}; see {run_dir / LOG}")
        write_status(run_dir, "paused", after_round=stop)
        console.print(f"Paused after round {stop}; resume with: fedsynth simulate --resume {run_dir}")
        return {}
    console.print(f"[2/2] Evaluating the release ({time.time() - start:.0f} s so far)")
    write_status(run_dir, "evaluating")
    with phase("fidelity, utility and privacy of the release"):
        report = evaluate_run(run, run_dir, start)
    h = report["headline"]
    console.rule("[bold]Headline")
    console.print(
        f"FID {h['fid']:.3g} | AUC gain (hybrid - real) internal {h['auc_gain_internal']:+.3f}, external {h['auc_gain_external']:+.3f} | "
        f"MI-AUC max {h['mi_auc_max']:.3f} | eps {_eps_line(h['epsilon'])} | FUP {h['fup']:.1f}"
    )
    console.print(f"Wall time {report['run']['wall_time_s']:.0f} s. Reports: {run_dir / 'report.json'} and {run_dir / 'report.html'}")
    gate_and_sign(run, run_dir, report)
    return report


def gate_and_sign(run: RunConfig, run_dir: Path, report: dict, override: str | None = None) -> dict:
    """The memorisation gate, then the signed release (server.export); a refusal raises ReleaseRefused."""
    from server.export import export_release

    result = export_release(run, run_dir, report, override)
    how = "OVERRIDDEN by the operator" if override and not result["passed"] else "passed"
    console.print(f"Memorisation gate {how}; signed release: {run_dir / 'synthetic'}")
    return result


def simulate(config: str, profile: str = "quick", output_dir: str | None = None, federate=run_federation,
             ray_address: str | None = None) -> Path:
    overrides = {"output_dir": output_dir} if output_dir else {}
    if ray_address:
        overrides["federation"] = {"ray_address": ray_address}
    run = load_run(config, profile, overrides=overrides or None)
    run_dir = new_run_dir(run)
    simulate_run(run, run_dir, federate)
    return run_dir


def load_run_dir(run_dir: Path) -> RunConfig:
    """The configuration a run folder was made with."""
    return run_from_dict(json.loads((Path(run_dir) / "config.json").read_text()))


def resume(run_dir: str | Path, ray_address: str | None = None) -> Path:
    """Continue a paused or interrupted run from its last checkpoint, with its own config
    (on another Ray cluster when ``ray_address`` is given)."""
    run_dir = Path(run_dir).resolve()
    run = load_run_dir(run_dir)
    fed = dataclasses.replace(run.federation, stop_after_round=None, ray_address=ray_address or run.federation.ray_address)
    run = dataclasses.replace(run, federation=fed)
    simulate_run(run, run_dir)
    return run_dir
