"""The server's export gate: a staged release becomes a signed release only if it passes.

``staging/`` (written by the federation, unsigned) -> memorisation gate on the evaluation's
release attacks -> ``synthetic/`` with ``data_card.json`` and ``DATASHEET.md``, every file
listed in the manifest, the gate's result (and any override) inside it, signed. A refusal
leaves the release staged and unsigned, writes ``gate.json`` and names the failing tests.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from common.config import RunConfig
from common.evaluation.gate import ReleaseRefused, check, data_card, datasheet_markdown, refusal_message
from common.runtime import sha256_file, write_json
from common.security.signing import MANIFEST, load_or_create_signing_key, release_files, sign_release

from .synthesis import RELEASE, STAGING, signing_key_path


def export_release(run: RunConfig, run_dir: Path, report: dict, override: str | None = None) -> dict:
    """Gate, card, sign. Returns the gate's result; raises :class:`ReleaseRefused` on a refusal
    unless ``override`` (the operator's stated reason) is given, which the signed manifest records."""
    staging, release = run_dir / STAGING, run_dir / RELEASE
    if not (staging / "synthetic.npz").exists():
        raise FileNotFoundError(f"{staging}: no staged release to export")
    staged = sha256_file(staging / "synthetic.npz")
    if report["privacy"]["release"].get("release_sha256") != staged:
        raise ValueError(f"{run_dir / 'report.json'}: its figures are of another release than {staging / 'synthetic.npz'} "
                         f"(sha256 {staged[:12]}...); score this one first (fedsynth evaluate)")
    result = check(report["privacy"]["release"], run.evaluation.gate)
    if not run.evaluation.gate.enabled:
        result = {**result, "passed": True, "note": "gate disabled in evaluation.gate.enabled; figures recorded"}
    if override:
        result["override"] = {"reason": override, "by": "operator flag --override-gate",
                              "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gate_passed": result["passed"]}
    write_json(run_dir / "gate.json", result)
    if not result["passed"] and not override:
        raise ReleaseRefused(f"{refusal_message(result)} (release left unsigned in {staging}; details in {run_dir / 'gate.json'})")
    manifest = json.loads((staging / MANIFEST).read_text())
    card = data_card(run, report, result, manifest)
    write_json(staging / "data_card.json", card)
    (staging / "DATASHEET.md").write_text(datasheet_markdown(card), encoding="utf-8")
    manifest["memorisation_gate"] = result
    manifest["files"] = {name: sha256_file(staging / name) for name in release_files(staging)}
    write_json(staging / MANIFEST, manifest)
    key = load_or_create_signing_key(signing_key_path(run, run_dir))  # before anything moves: a bad key leaves it staged
    if release.exists():
        shutil.rmtree(release)
    staging.rename(release)
    sign_release(release, key)
    return result
