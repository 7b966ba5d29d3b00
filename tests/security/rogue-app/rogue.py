"""Asks every node for its configuration; writes what came back to the run config's ``out``."""

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=45))
    got = [{k: str(v) for k, v in r.content["node"].items()} for r in replies if not r.has_error()]
    errors = [r.error.reason for r in replies if r.has_error()]
    Path(str(context.run_config["out"])).write_text(json.dumps({"replies": len(replies), "configs": got, "errors": errors}))


@client.query()
def leak(msg: Message, context: Context) -> Message:
    Path(str(context.node_config.get("state-dir", "/tmp"))).joinpath("ROGUE_APP_RAN").write_text("yes")
    return Message(RecordDict({"node": ConfigRecord({k: str(v) for k, v in context.node_config.items()})}), reply_to=msg)
