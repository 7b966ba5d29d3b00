"""The coordinator's dashboard: every run folder under one root, read as it is on disk.

Real images are shown only where the viewer may see them: a simulation, whose coordinator holds
every site's data. A deployment's page shows synthetic images and aggregate figures only.
Bound to 127.0.0.1 by default (docs/dashboard.md: behind a hospital's TLS reverse proxy).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.reporting.run_folder import RunFolder, is_number, list_runs, read_run

from . import plots
from .security import guard
from .templating import templates

HERE = Path(__file__).parent


def _public_key() -> Path | None:
    """The deployment's published release key: beside $FEDSYNTH_SIGNING_KEY, else certs/."""
    for key in (os.environ.get("FEDSYNTH_SIGNING_KEY"), "certs/release_signing.pem"):
        if key and (pub := Path(key).expanduser().with_suffix(".pub")).is_file():
            return pub
    return None


def signature_status(run: RunFolder, public_key: Path | None) -> dict:
    from common.security.signing import Unauthenticated, VerificationError, verify_release

    release = run.path / "synthetic"
    if not (release / "manifest.json").is_file():
        staged = any(run.path.glob("*/synthetic.npz"))
        return {"state": "unsigned", "detail": "staged, not signed (gate refused or not run yet)" if staged else "no release yet"}
    import json

    try:
        manifest = json.loads((release / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = None
    try:
        files = verify_release(release, public_key)
        return {"state": "verified", "detail": f"signature valid for {public_key}; {len(files)} file(s) match", "manifest": manifest}
    except Unauthenticated as exc:
        return {"state": "unauthenticated", "detail": str(exc), "manifest": manifest}
    except VerificationError as exc:
        return {"state": "failed", "detail": str(exc), "manifest": manifest}


def _with_interval(d: dict, key: str):
    v = d.get(key)
    ci = d.get(f"{key}_ci95")
    return (v, ci) if isinstance(ci, (list, tuple)) and len(ci) == 2 else (v, None)


def fidelity_rows(report: dict) -> list[dict]:
    f = report.get("fidelity") or {}
    ref, null = f.get("reference") or {}, f.get("null") or {}
    rows = []
    for key in ("fid", "kid", "precision", "recall", "density", "coverage"):
        if key in f:
            rows.append({"figure": key.upper() if key in ("fid", "kid") else key, "value": f[key],
                         "interval": f"± {f['kid_std']:.2g} (SD over subsets)" if key == "kid" and "kid_std" in f else None,
                         "real vs real": ref.get(key), "noise": null.get(key)})
    for c, v in (f.get("per_class") or {}).items():
        rows.append({"figure": f"FID class {c}", "value": v.get("fid"), "interval": None,
                     "real vs real": (f.get("per_class_reference") or {}).get(c, {}).get("fid"),
                     "noise": (f.get("per_class_null") or {}).get(c, {}).get("fid")})
    return rows


def utility_rows(report: dict) -> list[dict]:
    u = report.get("utility") or {}
    rows = []
    for site, s in (u.get("sites") or {}).items():
        for mode in ("real_only", *u.get("modes", [])):
            r = s.get(mode) or {}
            ext = next(iter((r.get("external") or {}).values()), {})
            rows.append({"site": site, "training": mode, "images": r.get("train_images"),
                         "AUC internal": (r.get("internal") or {}).get("auc"), "AUC external": ext.get("auc"),
                         "gain internal": s.get(f"{mode}_gain_internal"), "gain external": s.get(f"{mode}_gain_external")})
    return rows


def privacy_rows(report: dict) -> tuple[list[dict], list[dict]]:
    p = report.get("privacy") or {}
    sites = []
    for name, s in (p.get("sites") or {}).items():
        mi, ci = _with_interval(s, "mi_auc")
        sites.append({"site": name, "ε": s.get("epsilon"), "budget": s.get("epsilon_budget"), "δ": s.get("delta"),
                      "ε lower bound (audit)": s.get("epsilon_lower"), "unit": s.get("privacy_unit"),
                      "rounds": s.get("rounds_trained"), "declined": len(s.get("declined_rounds") or []),
                      "MI-AUC": mi, "MI-AUC 95% CI": ci})
    r = p.get("release") or {}
    dom = r.get("domias") or {}
    release = [
        {"attack": "DCR, share closer to training", "value": r.get("dcr_share_full"), "null / interval": r.get("dcr_null_q95"),
         "p": r.get("dcr_p_value")},
        {"attack": "DCR excess over null q95", "value": r.get("dcr_excess"), "null / interval": None, "p": None},
        {"attack": "DOMIAS membership AUC", "value": dom.get("auc"), "null / interval": dom.get("auc_ci95"), "p": None},
        {"attack": "re-identification rate", "value": r.get("reid_rate"), "null / interval": None, "p": None},
        {"attack": "exact / near duplicates", "value": f"{r.get('exact_duplicates')} / {r.get('near_duplicates')}", "null / interval": None, "p": None},
    ]
    return sites, release


def convergence_svgs(run: RunFolder, progress: dict | None = None) -> dict[str, str]:
    progress = progress or run.progress()
    sites = progress["sites"]
    by_budget: dict[float, list[str]] = {}
    for s, v in sites.items():
        if v.get("epsilon_budget") is not None:
            by_budget.setdefault(v["epsilon_budget"], []).append(s)
    budgets = {f"budget of {', '.join(names)} ({b:g})": b for b, names in by_budget.items()}
    eps = plots.curves({s: v["epsilon_by_round"] for s, v in sites.items()}, "ε spent per round per site", "ε", budgets)
    if run.kind == "simulation":
        loss = plots.curves({**{f"{s} train": v.get("train_loss_by_round", []) for s, v in sites.items()},
                             **{f"{s} held-out": v.get("heldout_loss_by_round", []) for s, v in sites.items()}},
                            "Loss per round (sites' local logs)", "loss")
    else:
        loss = plots.curves({}, "Loss per round", "loss", empty="losses stay at the hospitals (not DP-accounted)")
    return {"epsilon": eps, "loss": loss}


def study_headline(run: RunFolder) -> list[dict]:
    """A study's headline rows (arm, figure, mean, SD, 95% CI, n), read from study.json."""
    if run.kind != "study":
        return []
    from common.reporting.run_folder import read_json

    data, problem = read_json(run.path / "study.json")
    if problem:
        run.problems.append(problem)
        return []
    return [r for r in (data or {}).get("headline", []) if isinstance(r, dict)]


REPORTS = ("report.html", "study.html", "curve.html")
COMPARE_FIGURES = ["fup", "fidelity_F", "utility_U", "privacy_P", "fid", "coverage", "auc_gain_internal", "auc_gain_external",
                   "mi_auc_max", "domias_auc", "dcr_excess", "reid_rate"]


def create_app(root: str | os.PathLike, public_key: str | os.PathLike | None = None, allowed_hosts: list[str] | None = None) -> FastAPI:
    root = Path(root).resolve()
    key = Path(public_key) if public_key else _public_key()
    app = FastAPI(title="fedsynth dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    guard(app, allowed_hosts)

    def page(request: Request, name: str, status: int = 200, headers: dict | None = None, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"root": str(root), "dashboard": True, **context},
                                          status_code=status, headers=headers)

    def get_run(name: str) -> RunFolder:
        path = (root / name).resolve()  # a run folder under root, or one inside a comparison, curve or study
        hidden = any(part.startswith(".") for part in Path(name).parts)
        if not path.is_relative_to(root) or path == root or hidden or not path.is_dir():
            raise HTTPException(404, f"No run folder named {name!r} under {root}.")
        run = read_run(path)
        run.key = path.relative_to(root).as_posix()  # its name in URLs
        return run

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
        return page(request, "error.html", exc.status_code, message=exc.detail, code=exc.status_code)

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception):
        # A run folder being written, or damaged: a message and "try again", never a bare 500.
        message = (f"Could not read this page's run folder ({type(exc).__name__}: {exc}). It may be half-written; "
                   "reload once the run has moved on.")
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=503, headers={"Retry-After": "5"})
        return page(request, "error.html", 503, code=503, message=message, headers={"Retry-After": "5"})

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request):
        return page(request, "index.html", runs=[r.summary() for r in list_runs(root)], missing=not root.is_dir())

    @app.get("/api/runs")
    def api_runs():
        return [r.summary() for r in list_runs(root)]

    @app.get("/api/runs/{name:path}/progress")
    def api_progress(name: str):
        run = get_run(name)
        return {"state": run.state, **run.progress()}

    @app.get("/runs/{name:path}/convergence/{which}.svg")
    def convergence(name: str, which: str):
        run = get_run(name)
        svgs = convergence_svgs(run)
        if which not in svgs:
            raise HTTPException(404, f"No plot named {which!r}.")
        return Response(svgs[which], media_type="image/svg+xml", headers={"Cache-Control": "no-store"})

    @app.get("/runs/{name:path}/report.html", response_class=HTMLResponse)
    def static_report(name: str):
        """The run's own HTML report as fedsynth wrote it (report.html, study.html or curve.html)."""
        run = get_run(name)
        if run.kind == "deployment":  # report.html embeds real held-out images beside synthetic ones
            raise HTTPException(403, "A deployment's report.html shows real images, which stay at the hospitals; "
                                     "this page shows its synthetic images and aggregate figures.")
        for file in REPORTS:
            if (run.path / file).is_file():
                return HTMLResponse((run.path / file).read_text(encoding="utf-8"))
        raise HTTPException(404, f"{name} has no HTML report yet.")

    @app.get("/runs/{name:path}/grid/synthetic/{cls}.png")
    def synthetic_grid(name: str, cls: int):
        from server.synthesis import release_dir

        from .images import grid_png, synthetic_by_class

        release = release_dir(get_run(name).path) / "synthetic.npz"
        if not release.is_file():
            raise HTTPException(404, "This run has no synthetic release yet.")
        images = synthetic_by_class(release).get(cls)
        if images is None:
            raise HTTPException(404, f"No synthetic images of class {cls}.")
        return Response(grid_png(images), media_type="image/png")

    @app.get("/runs/{name:path}/grid/real/{site}/{cls}.png")
    def real_grid(name: str, site: str, cls: int):
        run = get_run(name)
        if not run.real_images_allowed:
            raise HTTPException(403, "Real images of a deployment stay at the hospitals: only synthetic images and "
                                     "aggregate figures are shown.")
        from .images import grid_png, real_by_site_and_class

        images = real_by_site_and_class(run.path).get(site, {}).get(cls)
        if images is None:
            raise HTTPException(404, f"No held-out images of class {cls} at {site}.")
        return Response(grid_png(images), media_type="image/png")

    @app.get("/runs/{name:path}/reader-studies/{study}", response_class=HTMLResponse)
    def reader_study_page(request: Request, name: str, study: str):
        from common.evaluation.reader_results import study_results
        from common.evaluation.reader_study import study_path

        run = get_run(name)
        try:
            path = study_path(run.path, study)
        except ValueError:
            raise HTTPException(404, f"No reader study named {study!r}.") from None
        if not path.is_file():
            raise HTTPException(404, f"No reader study named {study!r} in {name}.")
        return page(request, "reader_results.html", run=run, study=study, results=study_results(path))

    @app.get("/runs/{name:path}", response_class=HTMLResponse)  # last: the routes above end in fixed parts
    def run_page(request: Request, name: str):
        run = get_run(name)
        report = run.report or {}
        progress = run.progress()
        from server.synthesis import release_dir

        release = release_dir(run.path) / "synthetic.npz"
        classes = []
        if release.is_file():
            from .images import synthetic_by_class

            try:
                classes = sorted(synthetic_by_class(release))
            except Exception as exc:  # noqa: BLE001 (a release being written, or damaged: say so on the page)
                run.problems.append(f"{release.name} is unreadable or half-written ({type(exc).__name__})")
                release = release.with_name("missing")
        real_sites = [s for s in run.sites] if run.real_images_allowed and release.is_file() else []
        gate, gate_problem = (None, None)
        if (run.path / "gate.json").exists():
            from common.reporting.run_folder import read_json

            gate, gate_problem = read_json(run.path / "gate.json")
        studies = sorted(p.parent.name for p in (run.path / "reader_studies").glob("*/study.sqlite"))
        site_rows, release_rows = privacy_rows(report)
        return page(request, "run.html", run=run, summary=run.summary(), progress=progress, svgs=convergence_svgs(run, progress),
                    classes=classes, real_sites=real_sites, fidelity=fidelity_rows(report), utility=utility_rows(report),
                    privacy_sites=site_rows, privacy_release=release_rows, headline=run.headline,
                    signature=signature_status(run, key) if run.kind in ("simulation", "deployment") else None,
                    gate=gate, gate_problem=gate_problem, studies=studies, live=run.state in ("running", "evaluating"),
                    children=[c.summary() | {"path": c.path.relative_to(root).as_posix()} for c in run.children()],
                    report_file=None if run.kind == "deployment" else next((f for f in REPORTS if (run.path / f).is_file()), None), study_rows=study_headline(run))

    @app.get("/compare", response_class=HTMLResponse)
    def compare(request: Request, run: list[str] = Query(default=[])):
        if len(run) < 2:
            raise HTTPException(400, "Pick two or more runs to compare (tick them on the run list).")
        runs = [get_run(n) for n in run]
        base = runs[0].headline
        rows = []
        for fig in COMPARE_FIGURES:
            vals = [r.headline.get(fig) for r in runs]
            if not any(is_number(v) for v in vals):
                continue
            rows.append({"figure": fig, "values": vals,
                         "diffs": [v - base[fig] if is_number(v) and is_number(base.get(fig)) else None for v in vals]})
        series = {}
        for r in runs:
            for s, v in r.progress()["sites"].items():
                series[f"{r.key}: {s}"] = v["epsilon_by_round"]
        overlay = plots.curves(series, "ε per round, every run and site", "ε")
        loss_series = {f"{r.key}: {s}": v.get("train_loss_by_round", []) for r in runs for s, v in r.progress()["sites"].items()}
        loss = plots.curves(loss_series, "Training loss per round (simulations)", "loss", empty="no local losses (deployments)")
        return page(request, "compare.html", runs=runs, rows=rows, overlay=overlay, loss=loss)

    return app
