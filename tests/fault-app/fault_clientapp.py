"""fedsynth's ClientApp with one site's update replaced by NaN (run config ``corrupt-site``)."""

import torch
from flwr.app import ArrayRecord

from client.client_app import make_client_app, resolve_site
from common.appconfig import run_from_context


def corrupt_update(msg, ctxt, call_next):
    reply = call_next(msg, ctxt)
    site = resolve_site(run_from_context(ctxt), ctxt).name
    if site == ctxt.run_config["corrupt-site"] and "arrays" in reply.content:
        weights = reply.content["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord({k: torch.full_like(v, float("nan")) for k, v in weights.items()})
    return reply


app = make_client_app(run_from_context, mods=[corrupt_update])
