"""The terminal during a run: the user's lines and the warnings that matter stay on it; library
noise (Flower's INFO lines, Python warnings, raw writes to fd 2) goes to the run's log."""

import dataclasses
import json
import logging
import os
import sys
import warnings

import pytest

from simulations import terminal
from simulations.progress import FederationProgress, config_warnings
from simulations.terminal import console, output_to_log, warn


def test_library_noise_goes_to_the_run_log_not_the_terminal(tmp_path, capfd):
    from flwr.common import log as flwr_log

    log = tmp_path / "run" / "run.log"
    with output_to_log(log):
        console.print("round 1/2 for the user")
        warnings.warn("Secure RNG turned off (a library's notice)", UserWarning)
        flwr_log(logging.INFO, "configure_train: Sampled 2 nodes (out of 2)")
        os.write(2, b"raw C-level stderr\n")
        print("a library's print")
    out, err = capfd.readouterr()
    text = log.read_text()
    for noise in ("Secure RNG turned off", "configure_train: Sampled 2 nodes", "raw C-level stderr", "a library's print"):
        assert noise in text and noise not in out + err, noise
    assert "round 1/2 for the user" in err and "round 1/2 for the user" not in text


def test_a_warning_that_matters_reaches_the_terminal_and_the_log(tmp_path, capfd):
    with output_to_log(tmp_path / "run.log"):
        warn("site hospital_a declined round 2: privacy budget exhausted")
    _, err = capfd.readouterr()
    assert "Warning: site hospital_a declined round 2" in err
    assert "site hospital_a declined round 2" in (tmp_path / "run.log").read_text()


def test_a_warning_raised_by_fedsynths_own_code_reaches_the_terminal_a_librarys_does_not(tmp_path, capfd):
    from pathlib import Path

    import server
    import simulations

    ours = str(Path(simulations.__file__).parent / "deploy.py")
    with output_to_log(tmp_path / "run.log"):
        warnings.warn_explicit("INSECURE SuperLink: no TLS", UserWarning, filename=ours, lineno=61)
        warnings.warn_explicit("full backward hook will not fire", UserWarning, filename=torch_file(), lineno=1)
        record = logging.LogRecord("flwr", logging.WARNING, str(Path(server.__file__).parent / "strategy.py"), 1,
                                   "Refused a reply from node 7: no site is registered for its key", None, None)
        logging.getLogger("flwr").handle(record)
    _, err = capfd.readouterr()
    assert "Warning: INSECURE SuperLink: no TLS" in err and "Refused a reply from node 7" in err
    assert "full backward hook" not in err and "full backward hook" in (tmp_path / "run.log").read_text()


def torch_file() -> str:
    import torch

    return torch.__file__


def test_an_error_line_reaches_the_terminal_its_traceback_stays_in_the_log(tmp_path, capfd):
    with output_to_log(tmp_path / "run.log"):
        logging.getLogger("flwr").error("An exception occurred !! ClientApp failed")
        logging.getLogger("flwr").error("Traceback (most recent call last):\n  File ...")
    _, err = capfd.readouterr()
    assert "Error: An exception occurred !! ClientApp failed" in err and "Traceback" not in err


def test_everything_is_restored_after_an_exception_which_the_caller_still_sees(tmp_path, capfd):
    flwr_handlers, root_handlers = logging.getLogger("flwr").handlers[:], logging.getLogger().handlers[:]
    showwarning = warnings.showwarning
    with pytest.raises(RuntimeError, match="boom"):
        with output_to_log(tmp_path / "run.log"):
            raise RuntimeError("boom")
    os.write(2, b"after the run\n")
    print("fedsynth: error: boom", file=sys.stderr)  # what the CLI prints
    _, err = capfd.readouterr()
    assert "after the run" in err and "fedsynth: error: boom" in err
    assert "Traceback" in (tmp_path / "run.log").read_text()
    assert logging.getLogger("flwr").handlers == flwr_handlers and logging.getLogger().handlers == root_handlers
    assert warnings.showwarning is showwarning and console.file is sys.stderr and not terminal._redirected


def test_a_nested_run_keeps_the_outer_log(tmp_path, capfd):
    with output_to_log(tmp_path / "outer.log"):
        with output_to_log(tmp_path / "inner.log"):
            os.write(2, b"from a cell\n")
            console.print("cell done")
        console.print("still on the terminal")
    _, err = capfd.readouterr()
    assert "from a cell" in (tmp_path / "outer.log").read_text() and not (tmp_path / "inner.log").exists()
    assert "cell done" in err and "still on the terminal" in err


def test_dp_off_and_a_weak_budget_are_warned_before_training(tiny_run):
    assert config_warnings(tiny_run) == []
    off = dataclasses.replace(tiny_run, training=dataclasses.replace(tiny_run.training, dp=False))
    assert "WITHOUT differential privacy" in config_warnings(off)[0]
    site = tiny_run.training_sites[0]
    weak = dataclasses.replace(site, privacy=dataclasses.replace(site.privacy, epsilon=50.0))
    loose = dataclasses.replace(tiny_run, sites=[weak, *tiny_run.sites[1:]])
    assert config_warnings(loose) == [f"site {site.name}: epsilon budget 50 is a weak privacy guarantee (> 10)"]


def test_the_live_display_follows_the_ledger_and_warns_once_per_decline(tiny_run, tmp_path, capfd):
    from server.ledger import ServerLedger

    (tmp_path / "config.json").write_text(json.dumps(tiny_run.to_dict()))
    ledger = ServerLedger(tmp_path / "privacy_ledger.json")
    ledger.record("hospital_a", 1, {"epsilon": 7.16, "epsilon-budget": 8.0, "delta": 1e-5})
    ledger.record("hospital_c", 1, {"declined": 1}, "privacy budget exhausted")
    display = FederationProgress(tiny_run, tmp_path)
    display.poll()
    display.poll()
    console.print(display.render())
    _, err = capfd.readouterr()
    assert err.count("site hospital_c declined round 1: privacy budget exhausted") == 1
    assert "7.16 / 8" in err and "1/2" in err and "declined [1]" in err
