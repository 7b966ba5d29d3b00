"""What the readers of a study saw: detection, plausibility and agreement, with their tests.

* Detection, per reader: accuracy of the real/synthetic guess with a two-sided exact binomial
  test against chance (p = 0.5; only when half the images are real), balanced accuracy and
  Fisher's exact test of guess against truth (valid for any mix), and the ROC AUC of the
  plausibility rating for "real" (Hanley & McNeil's reading of a rating scale). Near 0.5 means
  readers cannot tell.
* Plausibility: mean rating of real vs synthetic images, Mann-Whitney U test (two-sided,
  tie-corrected normal approximation), per reader and pooled.
* Pooled means image by image (mean rating, majority guess over the readers): readers see the same
  images, so their answers are not independent and pooling them as if they were would overstate
  significance.
* Agreement, on the images every reader rated: quadratic-weighted Cohen's kappa for each pair
  of readers, Fleiss' kappa (ratings as categories; and the guesses), and Krippendorff's alpha
  at the ordinal level (missing answers allowed).
* Everything again per class.

scipy, scikit-learn, statsmodels and ``krippendorff`` compute the figures; nothing is re-derived here.
"""

from __future__ import annotations

import html
import itertools
import json
import math
from pathlib import Path

import numpy as np

from ..runtime import write_json
from .reader_study import RATINGS, answers_table


def _f(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def detection(rows: list[dict]) -> dict:
    """Detection and plausibility for answers that are independent of one another (one reader, or
    one row per image). Rows without a guess (a tied image) count for the ratings only."""
    from scipy.stats import binomtest, fisher_exact, mannwhitneyu
    from sklearn.metrics import roc_auc_score

    guessed = [r for r in rows if r["guess"] in ("real", "synthetic")]
    n, correct = len(guessed), sum(r["guess"] == r["truth"] for r in guessed)
    real_n = sum(r["truth"] == "real" for r in guessed)
    truth = np.array([r["truth"] == "real" for r in rows], dtype=bool)
    rating = np.array([r["rating"] for r in rows], dtype=float)
    table = [[sum(r["truth"] == t and r["guess"] == g for r in guessed) for g in ("real", "synthetic")] for t in ("real", "synthetic")]
    out = {"answers": len(rows), "guesses": n, "correct": correct, "accuracy": correct / n if n else None,
           # Mean of the hit rates on real and on synthetic images: 0.5 for any reader who cannot tell,
           # whatever the mix and whichever answer they favour.
           "balanced_accuracy": (table[0][0] / sum(table[0]) + table[1][1] / sum(table[1])) / 2 if all(map(sum, table)) else None,
           # Against 0.5 only when the images are half real: with another mix, always answering the
           # majority kind would "beat chance". Fisher's exact test (guess x truth) holds for any mix.
           "binomial_p": binomtest(correct, n, 0.5).pvalue if n and real_n * 2 == n else None,
           "fisher_p": _f(fisher_exact(table).pvalue) if n else None,
           "auc_rating": _f(roc_auc_score(truth, rating)) if 0 < truth.sum() < len(rows) else None,
           "mean_rating_real": _f(rating[truth].mean()) if truth.any() else None,
           "mean_rating_synthetic": _f(rating[~truth].mean()) if (~truth).any() else None}
    if truth.any() and (~truth).any():
        mw = mannwhitneyu(rating[truth], rating[~truth], alternative="two-sided", method="asymptotic", use_continuity=True)
        out["mann_whitney_u"], out["mann_whitney_p"] = float(mw.statistic), _f(mw.pvalue)
    return out


def by_image(rows: list[dict]) -> list[dict]:
    """One row per image: the readers' mean rating and their majority guess (None on a tie, which
    then counts for the ratings only). Readers rate the same images, so pooled answers are not
    independent; images are."""
    out = []
    for item in sorted({r["item"] for r in rows}):
        mine = [r for r in rows if r["item"] == item]
        real = sum(r["guess"] == "real" for r in mine)
        guess = "real" if real * 2 > len(mine) else "synthetic" if real * 2 < len(mine) else None
        out.append({"item": item, "truth": mine[0]["truth"], "label": mine[0]["label"],
                    "rating": float(np.mean([r["rating"] for r in mine])), "guess": guess})
    return out


def agreement(rows: list[dict], readers: list[str]) -> dict:
    """Agreement of the readers on the images that all of them rated (alpha also uses the rest)."""
    import krippendorff
    from sklearn.metrics import cohen_kappa_score
    from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

    items = sorted({r["item"] for r in rows})
    col = {item: j for j, item in enumerate(items)}
    ratings = np.full((len(readers), len(items)), np.nan)
    guesses = np.full((len(readers), len(items)), np.nan)
    for r in rows:
        i, j = readers.index(r["reader"]), col[r["item"]]
        ratings[i, j] = r["rating"]
        guesses[i, j] = r["guess"] == "real"
    complete = ~np.isnan(ratings).any(axis=0)
    out: dict = {"readers": len(readers), "images_rated_by_all": int(complete.sum())}
    if len(readers) < 2 or complete.sum() < 2:
        return out
    full = ratings[:, complete].astype(int)
    out["cohen_kappa_quadratic"] = {
        f"{readers[a]} vs {readers[b]}": _f(cohen_kappa_score(full[a], full[b], weights="quadratic", labels=list(RATINGS)))
        for a, b in itertools.combinations(range(len(readers)), 2)}
    if len(readers) > 2:
        table, _ = aggregate_raters(full.T, n_cat=None)
        out["fleiss_kappa_rating"] = _f(fleiss_kappa(table, method="fleiss"))
        gtable, _ = aggregate_raters(guesses[:, complete].astype(int).T, n_cat=None)
        out["fleiss_kappa_guess"] = _f(fleiss_kappa(gtable, method="fleiss"))
    try:
        out["krippendorff_alpha_ordinal"] = _f(krippendorff.alpha(reliability_data=ratings, level_of_measurement="ordinal",
                                                                  value_domain=list(RATINGS)))
    except ValueError:  # one value only: alpha is undefined
        out["krippendorff_alpha_ordinal"] = None
    return out


def study_results(path: str | Path) -> dict:
    meta, rows = answers_table(path)
    readers = [r["name"] for r in meta["readers"]]
    result = {
        "study": str(path), "source": meta.get("source"), "config": meta.get("config"),
        "real_images_by_site": meta.get("real_images_by_site"),
        "readers": {r["name"]: {"images": r["images"], "answered": r["answered"], "finished": r["finished_at"] is not None,
                                **detection([a for a in rows if a["reader"] == r["name"]])} for r in meta["readers"]},
        # All readers together, at the level of images (mean rating, majority guess): the unit the tests assume independent.
        "pooled": detection(by_image(rows)),
        "agreement": agreement(rows, readers),
        "per_class": {str(c): {"pooled": detection(by_image([a for a in rows if a["label"] == c])),
                               "agreement": agreement([a for a in rows if a["label"] == c], readers)}
                      for c in meta.get("classes", [])},
        "comments": [{"reader": a["reader"], "truth": a["truth"], "comment": a["comment"]} for a in rows if a["comment"]],
    }
    return result


def write_results(path: str | Path) -> tuple[Path, dict]:
    """``results.json`` beside the study file, and the study added to its run's report.json."""
    path = Path(path)
    result = study_results(path)
    out = path.parent / "results.json"
    write_json(out, result)
    run_dir = path.parents[2]  # runs/<run>/reader_studies/<name>/study.sqlite
    report = run_dir / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        data.setdefault("reader_studies", {})[path.parent.name] = result
        write_json(report, data)
    if (page := run_dir / "report.html").is_file():
        page.write_text(add_section(page.read_text(encoding="utf-8"), path.parent.name, result), encoding="utf-8")
    return out, result


def add_section(page: str, name: str, result: dict) -> str:
    """The study's tables in report.html, replacing an earlier version of the same study's section."""
    from ..reporting.report import html_table

    start, end = f"<!-- reader-study {name} -->", f"<!-- /reader-study {name} -->"
    if start in page and end in page:
        page = page[: page.index(start)] + page[page.index(end) + len(end):]
    readers = [{"reader": n, **{k: r.get(k) for k in ("answered", "accuracy", "binomial_p", "auc_rating", "mean_rating_real",
                                                      "mean_rating_synthetic", "mann_whitney_p")}}
               for n, r in {**result["readers"], "all readers, per image": {"answered": result["pooled"]["answers"], **result["pooled"]}}.items()]
    a = result["agreement"]
    agree = [{"figure": f"Cohen's kappa (quadratic), {pair}", "value": k} for pair, k in (a.get("cohen_kappa_quadratic") or {}).items()]
    agree += [{"figure": label, "value": a.get(key)} for key, label in (("fleiss_kappa_rating", "Fleiss' kappa, ratings"),
              ("fleiss_kappa_guess", "Fleiss' kappa, guesses"), ("krippendorff_alpha_ordinal", "Krippendorff's alpha (ordinal)"))]
    section = (f"{start}<h2>Reader study {html.escape(name)}</h2>"
               f"<p>Blinded readers rated real held-out and synthetic images (1 = clearly synthetic, 5 = clearly real).</p>"
               + html_table(readers, list(readers[0])) + html_table(agree, ["figure", "value"]) + end)
    return page.replace("</body>", section + "</body>") if "</body>" in page else page + section
