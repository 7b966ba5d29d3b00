"""The ``fedsynth`` command."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common.config import ConfigError
from common.evaluation.gate import ReleaseRefused
from common.data.medmnist import DataError
from common.privacy import PrivacyRefusal


def _simulate(args: argparse.Namespace) -> None:
    from .simulate import resume, simulate

    if args.resume:
        resume(args.resume, ray_address=args.ray_address)
    elif args.config:
        simulate(args.config, args.profile, args.output_dir, ray_address=args.ray_address)
    else:
        raise ConfigError("simulate: give a simulation YAML, or --resume RUN_DIR")


def _deploy_local(args: argparse.Namespace) -> None:
    from .deploy import run_local_deployment
    from .simulate import simulate

    simulate(args.config, args.profile, args.output_dir, federate=run_local_deployment)


def _compare(args: argparse.Namespace) -> None:
    from .compare import compare

    compare(args.config, args.profile, args.output_dir)


def _curve(args: argparse.Namespace) -> None:
    from common.evaluation.privacy_curve import privacy_curve

    privacy_curve(args.config, args.epsilons, args.profile, args.output_dir, central=not args.no_central)


def _mask_demo(args: argparse.Namespace) -> None:
    from .mask_conditioning import mask_demo

    mask_demo(args.config, args.output_dir)


def _evaluate(args: argparse.Namespace) -> None:
    from .simulate import evaluate_run, load_run_dir

    from common.reporting.run_folder import write_status

    run_dir = Path(args.run_dir).resolve()
    evaluate_run(load_run_dir(run_dir), run_dir)
    write_status(run_dir, "finished")  # a run that failed in its evaluation is whole again
    print(f"wrote {run_dir / 'report.json'} and {run_dir / 'report.html'}")


def _export(args: argparse.Namespace) -> None:
    from .simulate import evaluate_run, gate_and_sign, load_run_dir

    run_dir = Path(args.run_dir).resolve()
    run = load_run_dir(run_dir)
    from common.runtime import sha256_file
    from server.synthesis import STAGING

    report_path = run_dir / "report.json"
    # The gate needs the release attacks against the pooled training data: the evaluation's, of this very file.
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    staged = run_dir / STAGING / "synthetic.npz"
    if staged.exists() and report.get("privacy", {}).get("release", {}).get("release_sha256") != sha256_file(staged):
        report = evaluate_run(run, run_dir)
    if args.study:
        report["study"] = json.loads((Path(args.study) / "study.json").read_text())["headline"]
    gate_and_sign(run, run_dir, report, args.override_gate)


def _study(args: argparse.Namespace) -> None:
    from common.evaluation.study import run_study

    out = run_study(args.config, args.profile, args.output_dir, resume=args.resume)
    print(f"wrote {out / 'study.json'} and {out / 'study.html'}")


def _audit(args: argparse.Namespace) -> None:
    from common.evaluation.audit import audit_federation

    out = audit_federation(args.config, args.profile, args.output_dir, args.site, args.canaries)
    for r in json.loads((out / "audit.json").read_text())["sites"]:
        flag = {True: "VIOLATION", False: "ok", None: "no DP guarantee claimed (training.dp is false)"}[r["violation"]]
        print(f"{r['site']}: epsilon accounted {r['epsilon_accounted']}, empirical lower bound {r['epsilon_lower']:.3f} -> {flag}")
    print(f"wrote {out / 'audit.json'} and {out / 'audit.html'}")


def _ledger(args: argparse.Namespace) -> None:
    from common.privacy import reseal

    path = Path(args.ledger)
    if path.is_dir():
        path = path / "privacy_ledger.json"
    if args.action == "show":
        print(path.read_text())
        return
    if not args.reason:
        raise ConfigError("ledger reseal: --reason is required (it is recorded in the ledger)")
    event = reseal(path, args.reason, args.epsilon_budget, args.delta)
    print(f"resealed {path}: epsilon spent {event['epsilon_spent']:.4f}; recorded: {event}")


def _ingest(args: argparse.Namespace) -> None:
    from common.config import load_site, site_state_dir
    from common.data.ingest import ingest_site

    site = load_site(args.site)
    if site.source.kind == "medmnist":
        raise ConfigError(f"{site.origin}: source.kind is medmnist; nothing to ingest")
    s = ingest_site(site, args.image_size).summary
    print(f"site {s['site']}: {s['scans']} scans -> {s['slices']} slices from {s['patients']} patients in {s['seconds']:.1f} s "
          f"({s['reused_from_cache']} scans from cache)")
    print("images per label: " + ", ".join(f"{k}: {v}" for k, v in s["images_per_label"].items()))
    spp = s["slices_per_patient"]
    print(f"slices per patient: min {spp['min']}, median {spp['median']:g}, max {spp['max']}")
    print(f"quarantined: {s['quarantined']}" + "".join(f"\n  {r}: {n}" for r, n in s["quarantine_reasons"].items()))
    print(f"details: {site_state_dir(site) / 'quarantine.json'}")


def _certs(args: argparse.Namespace) -> None:
    from common.security.certs import make_certs

    done = make_certs(Path(args.out), args.host or [], force=args.force)
    for what in ("created", "kept"):
        if done[what]:
            print(f"{what}: " + ", ".join(done[what]))
    if done["kept"] and not args.force:
        print("existing files were kept; --force regenerates them (nodes must then trust the new ca.crt)")
    print(f"publish {Path(args.out) / 'release_signing.pub'}: verifiers check releases against it")


def _keygen(args: argparse.Namespace) -> None:
    from common.config import load_site
    from common.security.certs import keygen

    from .deploy import node_state

    site = load_site(args.site)
    out = Path(args.out) if args.out else node_state(Path(args.site), None)
    priv, pub = keygen(site.name, out, force=args.force)
    print(f"private key (stays here, mode 0600): {priv}\nsend to the coordinator: {pub}")


def _app_hash(args: argparse.Namespace) -> None:
    from client.node_exec import app_hash

    print(app_hash(Path(args.app)))


def _flwr_home(args) -> Path:
    return Path(args.flwr_home or os.environ.get("FLWR_HOME", "~/.flwr")).expanduser()


def _server(args: argparse.Namespace) -> None:
    from . import deploy

    state = Path(args.state).expanduser()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    internal = args.internal_port or args.port + 1
    cmds = [deploy.superlink_command(Path(args.certs), internal, state, args.insecure),
            deploy.gateway_command(Path(args.certs), args.host, args.port, internal, args.insecure)]
    deploy.write_connection(_flwr_home(args), f"127.0.0.1:{internal}", Path(args.certs), args.insecure)
    print(f"SuperLink on 127.0.0.1:{internal} (Control, Runtime: this machine only); Fleet API for the hospitals on "
          f"{args.host}:{args.port}", flush=True)
    raise SystemExit(deploy.supervise(cmds, _flwr_home(args)))


def _client(args: argparse.Namespace) -> None:
    from . import deploy

    state = deploy.node_state(Path(args.site), Path(args.state_dir) if args.state_dir else None)
    deploy.allow_installed_app(state)
    node, launcher = deploy.node_commands(Path(args.site), args.superlink, Path(args.ca), state, args.port,
                                          Path(args.key) if args.key else None, args.insecure)
    print(f"state folder: {state}; apps allowed: {state / 'allowed_apps.txt'}", flush=True)
    raise SystemExit(deploy.supervise([node, launcher]))


def _register(args: argparse.Namespace) -> None:
    from . import deploy

    registry = Path(args.state).expanduser() / deploy.REGISTRY
    for pair in args.key:
        site, sep, pub = pair.partition("=")
        if not sep or not site or not pub:
            raise ConfigError(f"register --key {pair!r}: expected SITE=PATH_TO_PUBLIC_KEY")
        node_id = deploy.register_node(site, Path(pub), registry, _flwr_home(args))
        print(f"registered {site} as node {node_id} in {registry}")


def _unregister(args: argparse.Namespace) -> None:
    from . import deploy

    registry = Path(args.state).expanduser() / deploy.REGISTRY
    node_id = deploy.unregister_node(args.site, registry, _flwr_home(args))
    print(f"unregistered {args.site} (node {node_id}); its key can no longer connect; removed from {registry}")


def _launch(args: argparse.Namespace) -> None:
    from common.appconfig import load_registry
    from common.config import load_run

    from . import deploy

    registry = Path(args.state).expanduser() / deploy.REGISTRY
    load_registry(registry)  # fails here, in one line, rather than in the ServerApp
    cmd = deploy.launch_command(load_run(args.config, args.profile), Path(args.run_dir), registry)
    raise SystemExit(subprocess.call(cmd, env=deploy._env(_flwr_home(args))))


def _verify(args: argparse.Namespace) -> None:
    from common.security.signing import Unauthenticated, VerificationError, verify_release

    release = Path(args.release)
    if (release / "synthetic").is_dir() and not (release / "manifest.json").exists():
        release = release / "synthetic"  # a run folder was given
    try:
        files = verify_release(release, Path(args.public_key) if args.public_key else None)
    except Unauthenticated as exc:
        print(f"fedsynth verify: UNAUTHENTICATED: {exc}", file=sys.stderr)
        raise SystemExit(4) from None
    except VerificationError as exc:
        print(f"fedsynth verify: FAILED: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"OK: signed by the key in {args.public_key}; {len(files)} file(s), every file listed and matching: {', '.join(files)}")


def _dashboard(args: argparse.Namespace) -> None:
    from dashboard.serve import serve_dashboard

    serve_dashboard(args.runs, args.host, args.port, args.public_key, args.allowed_host)


def _reader_study(args: argparse.Namespace) -> None:
    if args.action == "create":
        from common.evaluation.reader_study import create_from_run

        path, links = create_from_run(args.target, args.name, {
            "images": args.images, "synthetic_fraction": args.synthetic_fraction,
            "consenting_sites": args.consenting_sites, "readers": args.readers}, args.base_url)
        print(f"created {path}; send each reader their own link (also in {path.parent / 'links.txt'}, readable only by you):")
        for reader, link in links.items():
            print(f"  {reader}: {link}")
    elif args.action == "serve":
        from dashboard.serve import serve_reader_study

        serve_reader_study(args.target, args.host, args.port, args.allowed_host)
    else:
        from common.evaluation.reader_results import write_results

        out, result = write_results(args.target)
        for name, r in result["readers"].items():
            print(f"{name}: {r['answered']}/{r['images']} answered, accuracy {r['accuracy']}, binomial p {r['binomial_p']}, AUC {r['auc_rating']}")
        print(f"agreement: {result['agreement']}")
        print(f"wrote {out} (and the study into the run's report.json)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsynth", description="Federated, privacy-preserving synthesis of medical images")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="simulate every site of a federation on this machine, then score the release")
    p.add_argument("config", nargs="?", help="simulation YAML, e.g. simulations/demo.yaml")
    p.add_argument("--profile", default="quick", help="'quick' (default) or a profile named in the YAML, e.g. 'full'")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a paused or interrupted run from its last checkpoint")
    p.add_argument("--output-dir", default=None, help="where run folders go (default: the YAML's output_dir)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="run the simulated sites on an existing Ray cluster (e.g. 10.0.0.5:6379; docs/scaling.md)")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("deploy-local", help="run a federation as real processes on this machine (SuperLink + one "
                       "SuperNode per site, TLS + node authentication), then score the release")
    p.add_argument("config", help="simulation YAML, e.g. simulations/demo.yaml")
    p.add_argument("--profile", default="quick")
    p.add_argument("--output-dir", default=None)
    p.set_defaults(func=_deploy_local)

    p = sub.add_parser("compare", help="train several generators on one federation and compare them")
    p.add_argument("config", help="compare YAML, e.g. simulations/compare.yaml")
    p.add_argument("--profile", default="quick")
    p.add_argument("--output-dir", default=None)
    p.set_defaults(func=_compare)

    p = sub.add_parser("curve", help="quality versus privacy: the federation at several epsilons, the public prior "
                       "alone and central references at the same compute")
    p.add_argument("config")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0, float("inf")], help="per-site budgets; inf = no DP")
    p.add_argument("--profile", default="quick")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--no-central", action="store_true", help="skip the central non-DP and central DP references")
    p.set_defaults(func=_curve)

    p = sub.add_parser("mask-demo", help="mask-conditioned DDPM on real MNI152 slices, with segmentation Dice")
    p.add_argument("config", help="e.g. simulations/mask.yaml")
    p.add_argument("--output-dir", default=None)
    p.set_defaults(func=_mask_demo)

    p = sub.add_parser("evaluate", help="(re)score a finished run folder, e.g. one made by `flwr run .`")
    p.add_argument("run_dir")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("export", help="memorisation gate, data card and signature: release a staged run's synthetic data")
    p.add_argument("run_dir")
    p.add_argument("--override-gate", metavar="REASON", default=None,
                   help="sign even if the gate refuses; the reason is recorded in the signed manifest and data card")
    p.add_argument("--study", metavar="STUDY_DIR", default=None, help="put this study's headline table in the data card")
    p.set_defaults(func=_export)

    p = sub.add_parser("study", help="repeat a federation over seeds x patient-disjoint folds: intervals, paired tests, "
                       "effect sizes and a synthetic:real ratio ablation")
    p.add_argument("config", help="simulation YAML with a study section, e.g. simulations/demo.yaml")
    p.add_argument("--profile", default="quick", help="'quick' (a small grid) or 'full' (5 seeds x 3 folds)")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--resume", metavar="STUDY_DIR", default=None, help="continue a study; finished cells are kept")
    p.set_defaults(func=_study)

    p = sub.add_parser("audit", help="empirical privacy audit: a statistical lower bound on each site's epsilon")
    p.add_argument("config", help="simulation YAML, e.g. simulations/demo.yaml")
    p.add_argument("--profile", default="quick")
    p.add_argument("--site", action="append", help="audit only this training site (repeatable)")
    p.add_argument("--canaries", type=int, default=None, help="canaries per site (default: evaluation.audit.canaries)")
    p.add_argument("--output-dir", default=None)
    p.set_defaults(func=_audit)

    p = sub.add_parser("ledger", help="hospital operator: show a site's privacy ledger, or reseal it after review")
    p.add_argument("action", choices=["show", "reseal"])
    p.add_argument("ledger", help="the ledger file or the site's state folder")
    p.add_argument("--reason", help="reseal: why the operator accepts the ledger as it is (recorded)")
    p.add_argument("--epsilon-budget", type=float, help="reseal: a new epsilon budget (recorded)")
    p.add_argument("--delta", type=float, help="reseal: a new delta (recorded)")
    p.set_defaults(func=_ledger)

    p = sub.add_parser("ingest", help="turn a site's DICOM / NIfTI / image folder into cached, de-identified slices")
    p.add_argument("site", help="site YAML, e.g. sites/hospital_e.yaml")
    p.add_argument("--image-size", type=int, default=32, help="model image size (default 32)")
    p.set_defaults(func=_ingest)

    p = sub.add_parser("certs", help="coordinator: the federation's CA, the SuperLink's TLS certificate and the release-signing key")
    p.add_argument("--out", default="certs", help="output folder (default: certs/, outside runs/)")
    p.add_argument("--host", action="append", help="the SuperLink's public host name or IP (repeatable); "
                   "localhost, 127.0.0.1 and ::1 are always included")
    p.add_argument("--force", action="store_true", help="regenerate files that already exist")
    p.set_defaults(func=_certs)

    p = sub.add_parser("keygen", help="hospital: make this node's key pair; only the .pub goes to the coordinator")
    p.add_argument("--site", required=True, help="this hospital's site YAML")
    p.add_argument("--out", default=None, help="where (default: the node's state folder, the site's state_dir)")
    p.add_argument("--force", action="store_true", help="replace an existing key pair (the coordinator must re-register it)")
    p.set_defaults(func=_keygen)

    p = sub.add_parser("app-hash", help="hospital: the SHA-256 `flwr run` gives an app, for a node's allowed_apps.txt")
    p.add_argument("app", nargs="?", default=".", help="app folder (default: this checkout)")
    p.set_defaults(func=_app_hash)

    p = sub.add_parser("server", help="coordinator: start the SuperLink on loopback and the Fleet gateway the hospitals reach")
    p.add_argument("--certs", default="certs", help="folder made by `fedsynth certs`")
    p.add_argument("--host", default="127.0.0.1", help="address the Fleet gateway listens on (e.g. 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="the Fleet gateway's port")
    p.add_argument("--internal-port", type=int, default=None, help="the SuperLink's loopback port (default: --port + 1)")
    p.add_argument("--state", default="~/.fedsynth/superlink", help="the SuperLink's database and the node registry")
    p.add_argument("--flwr-home", default=None, help="where the coordinator's Flower connection is written (default $FLWR_HOME or ~/.flwr)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (test networks only; warns)")
    p.set_defaults(func=_server)

    p = sub.add_parser("register", help="coordinator: register hospitals' public keys and bind each to its site")
    p.add_argument("--key", action="append", required=True, metavar="SITE=PUB", help="a site name and the .pub its hospital sent (repeatable)")
    p.add_argument("--state", default="~/.fedsynth/superlink", help="as for `fedsynth server`: the node registry lives there")
    p.add_argument("--flwr-home", default=None)
    p.set_defaults(func=_register)

    p = sub.add_parser("unregister", help="coordinator: revoke a site's node key (before binding a new one)")
    p.add_argument("site", help="the site name")
    p.add_argument("--state", default="~/.fedsynth/superlink", help="as for `fedsynth server`: the node registry")
    p.add_argument("--flwr-home", default=None)
    p.set_defaults(func=_unregister)

    p = sub.add_parser("launch", help="coordinator: start a federated run on the SuperLink (flwr run)")
    p.add_argument("config", help="simulation YAML that names the sites and settings; its content is shipped, hashed")
    p.add_argument("--run-dir", required=True, help="where the server writes checkpoints, ledger and release")
    p.add_argument("--profile", default="quick")
    p.add_argument("--state", default="~/.fedsynth/superlink", help="as for `fedsynth server`: the node registry")
    p.add_argument("--flwr-home", default=None)
    p.set_defaults(func=_launch)

    p = sub.add_parser("client", help="hospital: start this site's SuperNode (runs only allowlisted apps)")
    p.add_argument("--site", required=True, help="this hospital's site YAML (local; the coordinator never needs it)")
    p.add_argument("--superlink", required=True, help="HOST:PORT of the coordinator's Fleet gateway")
    p.add_argument("--ca", default="certs/ca.crt", help="the federation's CA certificate, from the coordinator")
    p.add_argument("--key", default=None, help="this node's private key (default: <state-dir>/<site>.key from `fedsynth keygen`)")
    p.add_argument("--port", type=int, default=9094, help="local port for the SuperNode's own API")
    p.add_argument("--state-dir", help="local folder for the privacy ledger, key and allowlist (default: the site's state_dir; required)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (test networks only; warns)")
    p.set_defaults(func=_client)

    p = sub.add_parser("verify", help="check a synthetic release's signature against a trusted key, and every file")
    p.add_argument("release", help="a release folder (runs/<run>/synthetic) or a run folder")
    p.add_argument("--public-key", default=None, help="the deployment's published Ed25519 key (certs/release_signing.pub); "
                   "without it the result is UNAUTHENTICATED (exit 4)")
    p.set_defaults(func=_verify)

    p = sub.add_parser("dashboard", help="coordinator: a web dashboard of every run folder (live runs, images, "
                       "curves, F/U/P, release and gate, comparisons)")
    p.add_argument("runs", nargs="?", default="runs", help="the folder of run folders (default: runs/)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default loopback; see docs/dashboard.md for TLS)")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--public-key", default=None, help="the deployment's release_signing.pub, to verify releases "
                   "(default: beside $FEDSYNTH_SIGNING_KEY or certs/release_signing.pem)")
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="a host name the browser may use besides loopback: your reverse proxy's (repeatable)")
    p.set_defaults(func=_dashboard)

    p = sub.add_parser("reader-study", help="a blinded reader study of a release: create it, serve it to readers, "
                       "compute its results")
    p.add_argument("action", choices=["create", "serve", "results"])
    p.add_argument("target", help="create: a run folder; serve / results: the study file "
                   "(runs/<run>/reader_studies/<name>/study.sqlite)")
    p.add_argument("--name", default="study", help="create: the study's name (default: study)")
    p.add_argument("--images", type=int, default=None, help="create: images per reader (default: reader_study.images)")
    p.add_argument("--synthetic-fraction", type=float, default=None)
    p.add_argument("--consenting-sites", nargs="+", default=None, help="create: sites that agreed to show held-out images")
    p.add_argument("--readers", nargs="+", default=None, help="create: reader names (default: reader_study.readers)")
    p.add_argument("--base-url", default="http://127.0.0.1:8060", help="create: the address readers will open")
    p.add_argument("--host", default="127.0.0.1", help="serve: listen address")
    p.add_argument("--port", type=int, default=8060, help="serve: port")
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="serve: a host name readers' browsers use besides loopback: your reverse proxy's (repeatable)")
    p.set_defaults(func=_reader_study)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, DataError, FileNotFoundError, PrivacyRefusal, ValueError) as exc:
        print(f"fedsynth: error: {exc}", file=sys.stderr)
        return 2
    except ReleaseRefused as exc:
        print(f"fedsynth: REFUSED: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
