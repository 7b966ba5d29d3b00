"""A hospital node runs only the apps its operator allowed: Flower's SuperExec with an allowlist.

A SuperNode executes whatever app (FAB) the SuperLink sends it: whoever can start a run can run
code next to the hospital's images. Flower's own FAB verification (``--trusted-entities``) needs
signatures from the Flower platform, which a private deployment does not have. So the node runs
with ``--isolation process`` and this launcher takes the place of ``flower-superexec``: it is
Flower's SuperExec unchanged, except that a task whose app hash (SHA-256 of the FAB, which the
SuperNode checks against the FAB's content when it stores it) is not on the node's local
allowlist is refused with a one-line message in the node's log and never started.

The allowlist: the FAB of the fedsynth checkout the hospital installed (``app_hash``), plus any
hashes its operator adds (one per line in ``allowed_apps.txt`` in the node's state folder).
"""

from __future__ import annotations

import hashlib
import sys
from logging import ERROR, INFO
from pathlib import Path

ALLOWLIST_FILE = "allowed_apps.txt"


def app_hash(app_dir: Path) -> str:
    """The SHA-256 that ``flwr run <app_dir>`` gives this app's FAB (the same deterministic build)."""
    import warnings

    from flwr.cli.build import build_fab_from_disk

    with warnings.catch_warnings():  # pathspec's deprecation notes, once per ignore pattern
        warnings.simplefilter("ignore", DeprecationWarning)
        return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def read_allowlist(path: Path) -> set[str]:
    """Hashes, one per line; '#' starts a comment. A line that is not a SHA-256 is a one-line error."""
    allowed = set()
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        value = line.split("#", 1)[0].strip().lower()
        if not value:
            continue
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError(f"{path}:{n}: not a SHA-256 app hash: {value[:20]!r}")
        allowed.add(value)
    return allowed


def refuse_task(runtime_api_address: str, token: str, insecure: bool, root_certificates: str | None, reason: str) -> None:
    """Answer a refused task as a failed ClientApp would (an error reply and a FAILED status), with
    Flower's own Runtime API client and helpers. The app's FAB is fetched with the task but never
    installed, imported or run."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure,
        root_certificates=Path(root_certificates).read_bytes() if root_certificates else None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    try:
        message, context, _run, _fab = pull_task_input(client)
        push_message(client, Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message), context)
        push_task_output(client, context, SubStatus.FAILED, reason)
    finally:
        client.close()


def allowlisting_plugin(allowed: set[str]):
    """Flower's SuperExec plugin, refusing tasks whose app is not in ``allowed``."""
    from flwr.supercore import log
    from flwr.supercore.superexec.executor.types import LaunchResult
    from flwr.supercore.superexec.plugin import AutoExecPlugin

    class AllowlistExecPlugin(AutoExecPlugin):
        def launch_task(self, token, task):
            fab_hash = str(getattr(task, "fab_hash", "") or "")
            if fab_hash not in allowed:
                msg = (f"REFUSED app {fab_hash[:16] or '(none)'}...: not on this node's allowlist; the node runs only the "
                       f"fedsynth app its operator installed or listed in {ALLOWLIST_FILE}")
                log(ERROR, msg)
                try:  # answer the task, so the node moves on instead of waiting for it to expire
                    refuse_task(self.runtime_api_address, token, self.insecure, self.root_certificates_path,
                                "app refused by the node's allowlist")
                except Exception as exc:  # noqa: BLE001 - the app still never runs; the task then expires
                    log(ERROR, "could not answer the refused task (%s); it will expire", type(exc).__name__)
                    return LaunchResult.failed(msg)
                return LaunchResult.accepted()
            log(INFO, "App %s... is on the allowlist; starting it", fab_hash[:16])
            return super().launch_task(token, task)

    return AllowlistExecPlugin


def main(argv: list[str] | None = None) -> None:
    """``python -m client.node_exec --allowlist FILE <flower-superexec arguments>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--allowlist" not in args:
        raise SystemExit("client.node_exec: --allowlist FILE is required")
    i = args.index("--allowlist")
    path = Path(args[i + 1])
    try:
        allowed = read_allowlist(path)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"client.node_exec: {exc}") from None
    del args[i:i + 2]
    if not allowed:
        raise SystemExit(f"client.node_exec: {path} lists no app; this node would run nothing")

    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.superexec import run_superexec

    # flwr==1.41 (pinned): run_superexec builds its plugin from this module-level name. If a Flower
    # upgrade moved it, refuse to start rather than run every app unchecked.
    if not hasattr(run_superexec, "AutoExecPlugin"):
        raise SystemExit("client.node_exec: this Flower version has no run_superexec.AutoExecPlugin; the allowlist "
                         "cannot be enforced, so this node will not run apps (pin flwr as pyproject.toml does)")
    run_superexec.AutoExecPlugin = allowlisting_plugin(allowed)
    sys.argv = ["flower-superexec", *args]
    flower_superexec()


if __name__ == "__main__":
    main()
