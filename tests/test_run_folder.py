"""Reading a run folder: what kind of run it is, how far it got, and who may see its real images."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from common.reporting.run_folder import read_run, write_status


def folder(tmp_path, name: str, files: dict[str, object], dirs: tuple[str, ...] = ()):
    path = tmp_path / name
    path.mkdir()
    for d in dirs:
        (path / d).mkdir()
    for file, content in files.items():
        (path / file).write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize("files, dirs, kind", [
    ({"config.json": {}, "run_status.json": {"state": "finished", "mode": "simulate"}}, ("clients",), "simulation"),
    ({"config.json": {}, "run_status.json": {"state": "finished", "mode": "deploy-local"}}, ("deployment", "clients"), "deployment"),
    ({"config.json": {}, "history.json": {"train": []}}, (), "deployment"),  # `fedsynth launch`: the sites' data is elsewhere
    ({"config.json": {}}, ("clients",), "simulation"),  # a run folder from before run_status.json
    ({"study.json": {"headline": []}}, (), "study"),
    ({"curve.json": {"rows": []}}, (), "curve"),
    ({"config.json": {"base": {}, "epsilons": [1.0, 8.0]}}, (), "curve"),  # a curve still running its conditions
    ({"report.json": {}}, (), "comparison"),
])
def test_only_a_simulation_shows_real_images(tmp_path, files, dirs, kind):
    run = read_run(folder(tmp_path, "r", files, dirs))
    assert run.kind == kind
    assert run.real_images_allowed == (kind == "simulation")


def test_the_state_follows_the_status_file_and_whether_its_process_lives(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    cases = {
        "running": {"state": "running", **me},
        "evaluating": {"state": "evaluating", **me},
        "interrupted": {"state": "running", "pid": int(dead), "host": socket.gethostname()},  # killed, not finished
        "paused": {"state": "paused", **me},
        "failed": {"state": "failed", "error": "site hospital_a: no data", **me},
    }
    for expected, status in cases.items():
        run = read_run(folder(tmp_path, expected, {"config.json": {}, "run_status.json": status}))
        assert run.state == expected
    assert read_run(tmp_path / "failed").error == "site hospital_a: no data"


def test_a_half_written_file_is_a_problem_named_by_its_file_not_an_exception(tmp_path):
    run = read_run(folder(tmp_path, "r", {"config.json": '{"name": "x", "si', "report.json": '{"headline"'}))
    assert run.problems == ["config.json is unreadable or half-written (JSONDecodeError)",
                            "report.json is unreadable or half-written (JSONDecodeError)"]
    assert run.summary()["fup"] is None and run.progress()["rounds_done"] == 0


def test_the_mode_written_first_is_kept_by_later_phases(tmp_path):
    write_status(tmp_path, "running", mode="simulate")
    write_status(tmp_path, "finished")
    assert json.loads((tmp_path / "run_status.json").read_text())["mode"] == "simulate"


def test_a_comparison_or_study_knows_the_run_folders_inside_it(tmp_path):
    compare = folder(tmp_path, "compare", {"report.json": {}})
    for arm in ("ddpm", "vae"):
        folder(compare, arm, {"config.json": {}}, ("clients",))
    study = folder(tmp_path, "study", {"study.json": {"headline": []}})
    (study / "cells" / "ddpm" / "seed0-fold1").mkdir(parents=True)
    (study / "cells" / "ddpm" / "seed0-fold1" / "config.json").write_text("{}")
    assert [c.path.name for c in read_run(compare).children()] == ["ddpm", "vae"]
    assert [c.path.relative_to(study).as_posix() for c in read_run(study).children()] == ["cells/ddpm/seed0-fold1"]
    assert read_run(compare / "ddpm").children() == []  # a run is not a container
