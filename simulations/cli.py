"""The ``fedsynth`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import ConfigError
from common.data.medmnist import DataError


def _simulate(args: argparse.Namespace) -> None:
    from .simulate import resume, simulate

    if args.resume:
        resume(args.resume)
    elif args.config:
        simulate(args.config, args.profile, args.output_dir)
    else:
        raise ConfigError("simulate: give a simulation YAML, or --resume RUN_DIR")


def _compare(args: argparse.Namespace) -> None:
    from .compare import compare

    compare(args.config, args.profile, args.output_dir)


def _mask_demo(args: argparse.Namespace) -> None:
    from .mask_conditioning import mask_demo

    mask_demo(args.config, args.output_dir)


def _evaluate(args: argparse.Namespace) -> None:
    from common.config import run_from_dict

    from .simulate import evaluate_run

    import json

    run_dir = Path(args.run_dir).resolve()
    run = run_from_dict(json.loads((run_dir / "config.json").read_text()))
    evaluate_run(run, run_dir)
    print(f"wrote {run_dir / 'report.json'} and {run_dir / 'report.html'}")


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
    from common.config import load_site
    from common.security.certs import make_certs

    sites = [load_site(p).name for p in args.sites]
    done = make_certs(Path(args.out), sites, args.host or ["localhost", "127.0.0.1"], force=args.force)
    for what in ("created", "kept"):
        if done[what]:
            print(f"{what}: " + ", ".join(done[what]))
    if done["kept"] and not args.force:
        print("existing files were kept; --force regenerates them (sites must then re-register their keys)")


def _verify(args: argparse.Namespace) -> None:
    from common.security.signing import VerificationError, verify_release

    release = Path(args.release)
    if (release / "synthetic").is_dir() and not (release / "manifest.json").exists():
        release = release / "synthetic"  # a run folder was given
    try:
        files = verify_release(release, Path(args.public_key) if args.public_key else None)
    except VerificationError as exc:
        print(f"fedsynth verify: FAILED: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    if not args.public_key:
        print("note: checked against the public key shipped in the release; pass --public-key with the "
              "coordinator's published key to check who signed it")
    print(f"OK: signature valid; {len(files)} file(s) match: {', '.join(files)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsynth", description="Federated, privacy-preserving synthesis of medical images")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="simulate every site of a federation on this machine, then score the release")
    p.add_argument("config", nargs="?", help="simulation YAML, e.g. simulations/demo.yaml")
    p.add_argument("--profile", default="quick", help="'quick' (default) or a profile named in the YAML, e.g. 'full'")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a paused or interrupted run from its last checkpoint")
    p.add_argument("--output-dir", default=None, help="where run folders go (default: the YAML's output_dir)")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("compare", help="train several generators on one federation and compare them")
    p.add_argument("config", help="compare YAML, e.g. simulations/compare.yaml")
    p.add_argument("--profile", default="quick")
    p.add_argument("--output-dir", default=None)
    p.set_defaults(func=_compare)

    p = sub.add_parser("mask-demo", help="mask-conditioned DDPM on real MNI152 slices, with segmentation Dice")
    p.add_argument("config", help="e.g. simulations/mask.yaml")
    p.add_argument("--output-dir", default=None)
    p.set_defaults(func=_mask_demo)

    p = sub.add_parser("evaluate", help="(re)score a finished run folder, e.g. one made by `flwr run .`")
    p.add_argument("run_dir")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("ingest", help="turn a site's DICOM / NIfTI / image folder into cached, de-identified slices")
    p.add_argument("site", help="site YAML, e.g. sites/hospital_e.yaml")
    p.add_argument("--image-size", type=int, default=32, help="model image size (default 32)")
    p.set_defaults(func=_ingest)

    p = sub.add_parser("certs", help="create the federation's CA, SuperLink TLS certificate and site key pairs")
    p.add_argument("--out", default="certs", help="output folder (default: certs/)")
    p.add_argument("--sites", nargs="*", default=[], help="site YAMLs to make SuperNode key pairs for")
    p.add_argument("--host", action="append", help="SuperLink host name or IP for its certificate (repeatable)")
    p.add_argument("--force", action="store_true", help="regenerate files that already exist")
    p.set_defaults(func=_certs)

    p = sub.add_parser("verify", help="check a synthetic release's signature and every file it lists")
    p.add_argument("release", help="a release folder (runs/<run>/synthetic) or a run folder")
    p.add_argument("--public-key", default=None, help="the coordinator's Ed25519 public key (PEM)")
    p.set_defaults(func=_verify)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"fedsynth: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
