"""Client side of secure aggregation: two Flower mods around the unchanged handlers.

Flower 1.41 has SecAgg+ only in its legacy workflow API (see
:mod:`server.secure_aggregation` for why we use it rather than fork Flower).
That workflow speaks the legacy ``fitins``/``fitres`` records, while the
fedsynth handlers speak the Message API (``arrays``/``config`` in,
``arrays``/``metrics``/``site`` out). So:

* :func:`secaggplus_when_asked` runs Flower's own ``secaggplus_mod`` on the
  messages of a SecAgg+ round (it masks the update; the plain weights never
  leave) and lets every other message through untouched;
* :func:`legacy_records_mod` translates the legacy records to and from what the
  handlers expect, so ``client_app.train``/``evaluate`` never branch on it.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from common.checks import CheckFailed

# Keys of the fit/evaluate config that the coordinator adds for this mod (legacy records are lists).
ARRAY_KEYS = "array-keys"
CLIPPING_RANGE = "secagg-clipping-range"
MAX_WEIGHT = "secagg-max-weight"


def secaggplus_when_asked(msg: Message, ctxt: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ rounds only; a plain FedAvg round passes through."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def legacy_records_mod(msg: Message, ctxt: Context, call_next) -> Message:
    content = msg.content
    if "fitins.parameters" in content.array_records:
        kind = "fit"
        ins = compat.recorddict_to_fitins(content, keep_input=True)
    elif "evaluateins.parameters" in content.array_records:
        kind = "evaluate"
        ins = compat.recorddict_to_evaluateins(content, keep_input=True)
    else:
        return call_next(msg, ctxt)
    config = dict(ins.config)
    keys = str(config.pop(ARRAY_KEYS)).split("\n")
    arrays = parameters_to_ndarrays(ins.parameters)
    msg.content = RecordDict({"arrays": ArrayRecord(dict(zip(keys, map(torch.from_numpy, arrays), strict=True))), "config": ConfigRecord(config)})
    reply = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    metrics = dict(reply.content["metrics"])
    site = {k: str(v) for k, v in reply.content["site"].items()}
    if kind == "evaluate":
        # The held-out loss stays at the site; the legacy record needs a number, so 0.
        res = EvaluateRes(Status(Code.OK, ""), 0.0, 1, {**metrics, **site})
        reply.content = compat.evaluateres_to_recorddict(res)
        return reply
    if "arrays" in reply.content:  # trained: every site weighs the same (example counts are private)
        update = [reply.content["arrays"][k].numpy() for k in keys]
        weight = int(float(config[MAX_WEIGHT]))
        check_clipping_range(update, weight, float(config[CLIPPING_RANGE]), float(config[MAX_WEIGHT]))
    else:  # declined or evaluation-only: a zero-weight contribution keeps the masks whole (the
        # server counts the non-zero weights and unmasks no round with too few: server.secure_aggregation)
        update, weight = arrays, 0
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), weight, {**metrics, **site})
    reply.content = compat.fitres_to_recorddict(res, keep_input=False)
    return reply


def check_clipping_range(update: list[np.ndarray], weight: int, clipping_range: float, max_weight: float) -> None:
    """SecAgg+ silently clips weighted values to +-clipping_range and cannot carry NaN; the
    server never sees this update to reject it, so the node refuses to send it instead."""
    if not all(np.isfinite(a).all() for a in update):
        raise CheckFailed("update holds NaN or inf; not sent into secure aggregation")
    scale = min(weight, max_weight) / max_weight
    peak = max(float(np.abs(a).max()) for a in update if a.size) * scale
    if peak > clipping_range:
        raise CheckFailed(
            f"update exceeds federation.secure_aggregation.clipping_range ({peak:.3g} > {clipping_range}); raise it"
        )


MODS = [secaggplus_when_asked, legacy_records_mod]
