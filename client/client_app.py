"""fedsynth ClientApp (Flower Message API).

``train``: receive global weights, run DP-SGD locally, send back the DP weights
and the ledger's figures. ``evaluate``: the global model's held-out loss, kept in
the site's local log. Images never leave this process, and neither does any value
computed from them except through the accounted DP-SGD mechanism:
:data:`SENT_METRICS` is the whole list of what a site sends (tests check it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
import random
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from common.appconfig import run_from_context
from common.config import ConfigError, RunConfig, SiteConfig, load_site, site_state_dir
from common.data import SiteData
from common.data import load_site as load_site_data
from common.privacy import BudgetExceeded, LedgerError, PrivacyRefusal
from common.runtime import pick_device

from . import secure_aggregation
from .checks import check_site_data
from .trainer import append_local_log, heldout_loss, ledger_for, train_round

# Every metric a site may send, and why it is allowed (docs/privacy.md):
SENT_METRICS = {
    "epsilon": "the site's ledger: a function of (sigma, q, steps), i.e. of config and the count of privacy units",
    "epsilon-budget": "the site's configuration",
    "delta": "the site's configuration",
    "declined": "whether the ledger allowed the round (a function of the ledger)",
    "evaluation-only": "the site's role in its configuration",
    "evaluated": "1 when the site evaluated the model it was sent, as the coordinator asked (the loss stays at the site)",
    "weight": "constant 1: FedAvg weighs sites equally (example counts are private)",
}


def resolve_site(run: RunConfig, context: Context) -> SiteConfig:
    """A deployed node names its site YAML; a simulated node is given a partition id."""
    node = context.node_config
    if "site-config" in node:
        return load_site(str(node["site-config"]))
    sites = run.training_sites
    if int(node.get("num-partitions", len(sites))) != len(sites):
        raise ConfigError(f"{run.origin}: {node['num-partitions']} simulated nodes but {len(sites)} training sites")
    return sites[int(node["partition-id"])]


def not_training_here(run: RunConfig, site: SiteConfig) -> str:
    """Why this node must not train in ``run`` ("" when it may): an external hospital, or a
    connected node whose site the coordinator's run does not list."""
    if site.role == "external":
        return "evaluation-only site (role: external)"
    if site.name not in {s.name for s in run.training_sites}:
        return f"site {site.name} is not a training site of run {run.name}"
    return ""


def state_dir(site: SiteConfig, config: ConfigRecord, node: dict) -> Path:
    """Where the site's privacy ledger lives. A deployed node: the local folder its operator chose
    (``fedsynth client --state-dir``, default the site's own ``state_dir``), the same for every
    run, so the ε budget spans all runs; a deployed node without one refuses, since a folder
    under the coordinator's run folder would give every new run a fresh budget. A simulated
    site: a folder per site inside the run."""
    if "state-dir" in node and str(node["state-dir"]):
        return Path(str(node["state-dir"]))
    if "site-config" in node:
        raise LedgerError("this deployed node has no local state-dir; start it with `fedsynth client --state-dir DIR` "
                          "(or state_dir in its site file) so its privacy budget spans every run")
    if site.state_dir:
        return site_state_dir(site)
    return Path(str(config["run-dir"])) / "clients" / site.name


# Why a site's node failed, as it may tell the coordinator: a code, never the exception's text
# (which can hold a scan's path or a patient's identifier). Details stay in the site's own log.
REASON_CODES = ((ConfigError, "config_error"), (LedgerError, "ledger_error"), (PrivacyRefusal, "privacy_refusal"),
                (FileNotFoundError, "data_missing"), (OSError, "io_error"), (ValueError, "invalid_data"))
site_log = logging.getLogger("fedsynth.site")


def reason_code(exc: BaseException) -> str:
    return next((code for kind, code in REASON_CODES if isinstance(exc, kind)), "internal_error")


def private_errors(msg: Message, ctxt: Context, call_next) -> Message:
    """Outermost mod: any exception becomes a generic reason code for the coordinator, with an
    incident id that the site's operator finds, with the full traceback, in its local log."""
    try:
        return call_next(msg, ctxt)
    except Exception as exc:  # noqa: BLE001 - nothing a handler raises may reach the coordinator as text
        incident, code = secrets.token_hex(6), reason_code(exc)
        handler = None
        try:  # the details, which may name a scan or a patient, stay here, owner-only
            if (folder := str(ctxt.node_config.get("state-dir", "") or "")):
                path = Path(folder) / "site_errors.log"
                Path(folder).mkdir(parents=True, exist_ok=True, mode=0o700)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
                handler = logging.FileHandler(path)
                site_log.addHandler(handler)
            site_log.error("incident %s (%s): %s", incident, code, exc, exc_info=exc)
        except Exception:  # noqa: BLE001 - a full disk must not turn into a message with the path in it
            code = f"{code}+log_failed"
        finally:
            if handler is not None:
                site_log.removeHandler(handler)
                handler.close()
        reason = f"site error: {code} (incident {incident}; details in the site's local log)"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def simulated_fault(run: RunConfig, site: SiteConfig, server_round: int) -> str:
    """"dropout", "straggler" or "" for this site in this round of a simulation: seeded by
    (run seed, round, site), so a rerun sees the same faults and a test can replay them."""
    fed = run.federation
    rng = random.Random(f"{run.seed}:{server_round}:{site.name}:fault")
    if rng.random() < fed.dropout_rate:
        return "dropout"
    if rng.random() < fed.straggler_rate:
        return "straggler"
    return ""


_SITES: OrderedDict[tuple[str, str], SiteData] = OrderedDict()
SITE_CACHE_SIZE = 8  # sites whose prepared images a simulation worker keeps between rounds


def site_data(run: RunConfig, site: SiteConfig, simulation: bool) -> SiteData:
    """The site's prepared images. A simulation's worker process (a Ray actor, alive for the whole
    run) keeps the last few sites it served, keyed by the whole run configuration, so a round does
    not redo the partition and the scanner profile; a deployed node's ClientApp is a new process
    per message and always loads."""
    if not simulation:
        return load_site_data(run, site)
    where = os.environ.get("FEDSYNTH_DATA_DIR", "")
    key = (hashlib.sha256(json.dumps([run.to_dict(), where], sort_keys=True, default=str).encode()).hexdigest(), site.name)
    if key in _SITES:
        _SITES.move_to_end(key)
        return _SITES[key]
    _SITES[key] = data = load_site_data(run, site)
    while len(_SITES) > SITE_CACHE_SIZE:
        _SITES.popitem(last=False)
    return data


def ray_placement() -> dict:
    """Which Ray node ran this simulated site's round (its local log shows how a cluster spread the work)."""
    try:
        import ray

        return {"ray_node": ray.get_runtime_context().get_node_id()} if ray.is_initialized() else {}
    except Exception:  # noqa: BLE001 - outside a Ray worker there is nothing to record
        return {}


def log_heldout_loss(run: RunConfig, data: SiteData, weights: dict, where: Path, server_round: int) -> None:
    """The global model's held-out loss: a function of the site's images, so it stays in the site's own log."""
    loss = heldout_loss(run, data, weights, pick_device())
    append_local_log(where, {"round": server_round, "kind": "evaluate", "heldout_loss": loss})


def _metrics(values: dict[str, float]) -> MetricRecord:
    return MetricRecord({k.replace("_", "-"): float(v) for k, v in values.items()})


def make_client_app(get_run: Callable[[Context], RunConfig], simulation: bool = False, mods: list | None = None) -> ClientApp:
    """``simulation=True`` only from ``fedsynth simulate``: the one place a non-private
    baseline (``training.dp: false``) may train. A deployed node always refuses it.
    The secure-aggregation mods act only in a SecAgg+ run; ``mods`` are extra Flower mods."""
    app = ClientApp(mods=[private_errors, *secure_aggregation.MODS, *(mods or [])])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run = get_run(context)
        site = resolve_site(run, context)
        if (reason := not_training_here(run, site)):  # its images never train in this run
            info = ConfigRecord({"site": site.name, "reason": reason})
            return Message(RecordDict({"metrics": _metrics({"evaluation_only": 1}), "site": info}), reply_to=msg)
        config = msg.content["config"]
        where = state_dir(site, config, context.node_config)
        if simulation and (fault := simulated_fault(run, site, int(config["server-round"]))):
            append_local_log(where, {"round": int(config["server-round"]), "kind": f"simulated_{fault}"})
            if fault == "dropout":  # unreachable this round: no data read, nothing spent
                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="simulated dropout"), reply_to=msg)
            time.sleep(run.federation.straggler_delay_s)
        if (shipped := str(context.run_config.get("config-sha256", "") or "")):  # what this node trained under
            append_local_log(where, {"round": int(config["server-round"]), "kind": "config", "config_sha256": shipped})
        data = site_data(run, site, simulation)
        check_site_data(data)
        incoming = msg.content["arrays"].to_torch_state_dict()
        evaluated = 0
        if int(config.get("evaluate-incoming", 0)):  # the previous round's global model, evaluated in this same call
            try:
                log_heldout_loss(run, data, incoming, where, int(config["server-round"]) - 1)
                evaluated = 1
            except Exception as exc:  # noqa: BLE001 - a failed evaluation must not cost the round's training
                append_local_log(where, {"round": int(config["server-round"]) - 1, "kind": "evaluate_failed",
                                         "reason": f"{type(exc).__name__}: {exc}"})
        # The unit of privacy follows from the site's source: patients where ingestion knows them.
        info = ConfigRecord({"site": site.name, "reason": "", "privacy-unit": data.privacy_unit})
        try:
            if not run.training.dp and not simulation:
                raise BudgetExceeded("this node trains only with differential privacy (training.dp is false)")
            result = train_round(
                run, site, data, incoming, int(config["server-round"]), where, pick_device(),
                note=ray_placement() if simulation else None,
            )
        except PrivacyRefusal as exc:
            info["reason"] = str(exc)
            metrics = {"declined": 1, "weight": 1, "evaluated": evaluated}
            try:
                ledger = ledger_for(run, site, where)
                metrics.update(epsilon=ledger.spent, epsilon_budget=ledger.epsilon_budget, delta=ledger.delta)
            except LedgerError:
                pass  # the reason already says why the ledger cannot be read
            return Message(RecordDict({"metrics": _metrics(metrics), "site": info}), reply_to=msg)
        metrics = _metrics({**result.metrics, "declined": 0, "weight": 1, "evaluated": evaluated})
        content = RecordDict({"arrays": ArrayRecord(result.weights), "metrics": metrics, "site": info})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        run = get_run(context)
        site = resolve_site(run, context)
        data = site_data(run, site, simulation)
        log_heldout_loss(run, data, msg.content["arrays"].to_torch_state_dict(), state_dir(site, msg.content["config"], context.node_config),
                         int(msg.content["config"].get("server-round", 0)))
        metrics = _metrics({"evaluated": 1, "weight": 1})
        return Message(RecordDict({"metrics": metrics, "site": ConfigRecord({"site": site.name})}), reply_to=msg)

    return app


# Entry point for `flwr run .` / a deployed SuperNode: the YAML path comes from the run config.
app = make_client_app(run_from_context)
