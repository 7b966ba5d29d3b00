"""A blinded reader study of a release (the first paper's visual Turing test).

Readers see a randomised mix of synthetic images and real held-out images, stratified by class,
and give each a 5-point plausibility rating (1 = clearly synthetic, 5 = clearly real), a
real/synthetic guess and optional free text. Real images come only from the sites listed in
``reader_study.consenting_sites``; the study records which.

One SQLite file per study (WAL mode, one transaction per answer): an answer is on disk before
the reader sees the next image, so killing the server loses nothing, and the primary key
(reader, image) makes a repeated submit a no-op. A reader is known only by a random token; the
file keeps its SHA-256, never the token, and each reader's order of images is their own.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from ..config import ConfigError, ReaderStudyConfig, run_from_dict

RATINGS = (1, 2, 3, 4, 5)
GUESSES = ("real", "synthetic")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, public_id TEXT UNIQUE NOT NULL, png BLOB NOT NULL,
    truth TEXT NOT NULL CHECK (truth IN ('real', 'synthetic')), label INTEGER NOT NULL, site TEXT);
CREATE TABLE IF NOT EXISTS readers (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, token_sha256 TEXT UNIQUE NOT NULL,
    item_order TEXT NOT NULL, finished_at REAL);
CREATE TABLE IF NOT EXISTS answers (
    reader_id INTEGER NOT NULL REFERENCES readers(id), item_id INTEGER NOT NULL REFERENCES items(id),
    rating INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
    guess TEXT NOT NULL CHECK (guess IN ('real', 'synthetic')),
    comment TEXT NOT NULL DEFAULT '', answered_at REAL NOT NULL,
    PRIMARY KEY (reader_id, item_id));
"""


class StudyError(ValueError):
    """A study that cannot be created or read, with the file or field that is wrong."""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def connect(path: str | Path, create: bool = False) -> sqlite3.Connection:
    path = Path(path)
    if not create and not path.is_file():
        raise StudyError(f"{path}: no reader study here (make one with `fedsynth reader-study create`)")
    db = sqlite3.connect(path, timeout=30, isolation_level=None)  # autocommit; explicit transactions below
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # an acknowledged answer survives a power cut, not only a kill
    db.execute("PRAGMA foreign_keys=ON")
    return db


def _png(image_u8: np.ndarray) -> bytes:
    """One grey image as a PNG with no metadata: real and synthetic go through the same bytes path."""
    from PIL import Image

    buf = io.BytesIO()
    # Uncompressed: a compressed size would tell real from synthetic (AUC 0.72 on the demo's release).
    Image.fromarray(image_u8, mode="L").save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def _to_u8(x) -> np.ndarray:
    """(N, 1, S, S) floats in [0, 1] -> (N, S, S) uint8."""
    arr = np.asarray(x, dtype=np.float32)
    return np.clip(np.rint(arr[:, 0] * 255.0), 0, 255).astype(np.uint8)


@dataclass
class Pools:
    """Images to draw from: synthetic (release) and real (held-out, consenting sites), uint8 (N, S, S)."""

    synthetic: np.ndarray
    synthetic_labels: np.ndarray
    real: np.ndarray
    real_labels: np.ndarray
    real_sites: np.ndarray  # the site of each real image


def released_file(run_dir: Path) -> Path:
    """The signed release's images: never a staged set the memorisation gate has not passed."""
    from common.security.signing import VerificationError, check_files

    release = Path(run_dir) / "synthetic"
    if not (release / "manifest.json").is_file():
        raise StudyError(f"{release}: no signed release (a staged or refused release never goes to readers; "
                         "`fedsynth export` signs one once the memorisation gate passes)")
    try:
        check_files(release)  # the images are the ones the manifest lists
    except VerificationError as exc:
        raise StudyError(f"{release}: {exc}") from None
    return release / "synthetic.npz"


def pools_from_run(run_dir: Path, cfg: ReaderStudyConfig) -> Pools:
    """The signed release's images and the consenting sites' held-out images, as the run's config loads them.

    Only a simulation's coordinator holds the sites' data; a deployment's real images stay at the
    hospitals, so a study of a deployment is refused here."""
    from common.data.sites import load_site
    from common.reporting.run_folder import read_run
    from server.synthesis import load_synthetic

    if (kind := read_run(run_dir).kind) != "simulation":
        raise StudyError(f"{run_dir}: a {kind} run: its sites' real images stay at the hospitals, so this machine "
                         "cannot draw them (run the study where the consenting sites' data is, e.g. a simulation)")
    run = run_from_dict(json.loads((run_dir / "config.json").read_text()))
    release = released_file(run_dir)
    if not cfg.consenting_sites:
        raise StudyError(f"{run_dir / 'config.json'}: reader_study.consenting_sites is empty: "
                         "real images may come only from sites that agreed, and a detection study needs some")
    sx, sy = load_synthetic(release)
    real, labels, sites = [], [], []
    by_name = {s.name: s for s in run.sites}
    for name in cfg.consenting_sites:
        if name not in by_name:
            raise StudyError(f"reader_study.consenting_sites: {name!r} is not a site of {run_dir.name} (have: {sorted(by_name)})")
        data = load_site(run, by_name[name])  # held-out images only: none trained the generator
        real.append(_to_u8(data.holdout_x))
        labels.append(data.holdout_y.numpy())
        sites += [name] * len(data.holdout_y)
    return Pools(_to_u8(sx), sy.numpy().astype(int), np.concatenate(real), np.concatenate(labels).astype(int), np.array(sites))


def _draw(rng: np.random.Generator, labels: np.ndarray, per_class: dict[int, int], what: str) -> np.ndarray:
    picked = []
    for c, n in per_class.items():
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            raise StudyError(f"reader_study.images: class {c} needs {n} {what} images, the pool has {len(idx)}")
        picked.append(rng.choice(idx, size=n, replace=False))
    return np.concatenate(picked) if picked else np.array([], dtype=int)


def _split(total: int, classes: list[int]) -> dict[int, int]:
    base, extra = divmod(total, len(classes))
    return {c: base + (i < extra) for i, c in enumerate(classes)}


def create_study(path: Path, pools: Pools, cfg: ReaderStudyConfig, source: dict) -> dict[str, str]:
    """Write a new study file; returns each reader's token (shown once: the file keeps only hashes)."""
    path = Path(path)
    if path.exists():
        raise StudyError(f"{path}: a study already exists here; give another --name")
    if len(set(cfg.readers)) != len(cfg.readers) or not cfg.readers:
        raise StudyError(f"reader_study.readers: need distinct reader names, got {cfg.readers}")
    if stray := sorted(set(pools.real_sites.tolist()) - set(cfg.consenting_sites)):
        raise StudyError(f"reader_study.consenting_sites: real images from {stray}, which did not agree to show them")
    classes = sorted(set(pools.synthetic_labels.tolist()) | set(pools.real_labels.tolist()))
    n_syn = int(round(cfg.images * cfg.synthetic_fraction))
    # Blinding rests on a secret draw: a public seed would let anyone rebuild the key.
    rng = np.random.default_rng(secrets.randbits(128))
    syn = _draw(rng, pools.synthetic_labels, _split(n_syn, classes), "synthetic")
    real = _draw(rng, pools.real_labels, _split(cfg.images - n_syn, classes), "real")
    items = [(pools.synthetic[i], "synthetic", int(pools.synthetic_labels[i]), None) for i in syn]
    items += [(pools.real[i], "real", int(pools.real_labels[i]), str(pools.real_sites[i])) for i in real]
    items = [items[i] for i in rng.permutation(len(items))]
    path.parent.mkdir(parents=True, exist_ok=True)
    db = connect(path, create=True)
    tokens: dict[str, str] = {}
    try:
        db.executescript(SCHEMA)
        db.execute("BEGIN IMMEDIATE")
        meta = {"created": time.time(), "config": {"images": cfg.images, "synthetic_fraction": cfg.synthetic_fraction,
                                                    "consenting_sites": list(cfg.consenting_sites)},
                "source": source, "classes": classes,
                "real_images_by_site": {s: sum(1 for it in items if it[3] == s) for s in sorted({it[3] for it in items if it[3]})}}
        db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        db.executemany("INSERT INTO items (public_id, png, truth, label, site) VALUES (?, ?, ?, ?, ?)",
                       [(secrets.token_urlsafe(12), _png(img), truth, label, site) for img, truth, label, site in items])
        ids = [r["id"] for r in db.execute("SELECT id FROM items ORDER BY id")]
        for name in cfg.readers:
            tokens[name] = secrets.token_urlsafe(32)
            order = [ids[i] for i in rng.permutation(len(ids))]
            db.execute("INSERT INTO readers (name, token_sha256, item_order) VALUES (?, ?, ?)",
                       (name, _hash(tokens[name]), json.dumps(order)))
        db.execute("COMMIT")
    except BaseException:
        db.close()
        path.unlink(missing_ok=True)
        raise
    db.close()
    return tokens


@dataclass
class Reader:
    id: int
    name: str
    order: list[int]
    finished: bool


class Study:
    """One study file, as the reader-facing server uses it: by token, one reader at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db = connect(self.path)
        self.meta = {r["key"]: json.loads(r["value"]) for r in self.db.execute("SELECT key, value FROM meta")}

    def close(self) -> None:
        self.db.close()

    def reader(self, token: str) -> Reader | None:
        row = self.db.execute("SELECT id, name, item_order, finished_at FROM readers WHERE token_sha256 = ?", (_hash(token),)).fetchone()
        if row is None:
            return None
        return Reader(row["id"], row["name"], json.loads(row["item_order"]), row["finished_at"] is not None)

    def answered(self, reader: Reader) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT item_id FROM answers WHERE reader_id = ?", (reader.id,))}

    def next_item(self, reader: Reader) -> tuple[int, str] | None:
        """(position, public id) of the reader's first unanswered image, or None when all are done."""
        done = self.answered(reader)
        for pos, item in enumerate(reader.order):
            if item not in done:
                return pos, self.db.execute("SELECT public_id FROM items WHERE id = ?", (item,)).fetchone()[0]
        return None

    def image(self, reader: Reader, public_id: str) -> bytes | None:
        row = self.db.execute("SELECT id, png FROM items WHERE public_id = ?", (public_id,)).fetchone()
        return row["png"] if row is not None and row["id"] in reader.order else None

    def answer(self, reader: Reader, public_id: str, rating: int, guess: str, comment: str = "") -> bool:
        """Record an answer; False if this reader already answered this image (the first answer stands)."""
        if rating not in RATINGS or guess not in GUESSES:
            raise StudyError(f"answer: rating must be 1-5 and guess real or synthetic, got {rating!r}, {guess!r}")
        row = self.db.execute("SELECT id FROM items WHERE public_id = ?", (public_id,)).fetchone()
        if row is None or row["id"] not in reader.order:
            raise StudyError("answer: no such image in this study")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            cur = self.db.execute(
                "INSERT INTO answers (reader_id, item_id, rating, guess, comment, answered_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (reader_id, item_id) DO NOTHING",
                (reader.id, row["id"], rating, guess, comment[:2000], time.time()))
            if len(self.answered(reader)) == len(reader.order):
                self.db.execute("UPDATE readers SET finished_at = ? WHERE id = ? AND finished_at IS NULL", (time.time(), reader.id))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return cur.rowcount == 1


def answers_table(path: str | Path) -> tuple[dict, list[dict]]:
    """(meta, one row per answer with the key joined in): for the coordinator, never a reader."""
    db = connect(path)
    try:
        meta = {r["key"]: json.loads(r["value"]) for r in db.execute("SELECT key, value FROM meta")}
        meta["readers"] = [dict(r) for r in db.execute(
            "SELECT r.name, r.finished_at, json_array_length(r.item_order) AS images, COUNT(a.item_id) AS answered "
            "FROM readers r LEFT JOIN answers a ON a.reader_id = r.id GROUP BY r.id ORDER BY r.id")]
        rows = [dict(r) for r in db.execute(
            "SELECT r.name AS reader, i.id AS item, i.truth, i.label, i.site, a.rating, a.guess, a.comment, a.answered_at "
            "FROM answers a JOIN readers r ON r.id = a.reader_id JOIN items i ON i.id = a.item_id ORDER BY r.id, i.id")]
    finally:
        db.close()
    return meta, rows


def study_path(run_dir: Path, name: str) -> Path:
    if not name or not all(ch.isalnum() or ch in "-_" for ch in name):
        raise ConfigError(f"reader-study --name: use letters, digits, - and _ only, got {name!r}")
    return Path(run_dir) / "reader_studies" / name / "study.sqlite"


def create_from_run(run_dir: str | Path, name: str, overrides: dict | None = None, base_url: str = "http://127.0.0.1:8060") -> tuple[Path, dict[str, str]]:
    """A study of ``run_dir``'s release with the run's ``reader_study`` settings (``overrides`` on top).

    Returns the study file and each reader's personal link. The links are also written, 0600, to
    ``links.txt`` beside the file for the coordinator to send; the study file keeps only hashes.
    """
    import dataclasses
    import os


    run_dir = Path(run_dir).resolve()
    cfg = run_from_dict(json.loads((run_dir / "config.json").read_text())).reader_study
    if overrides:
        try:
            cfg = ReaderStudyConfig(**{**dataclasses.asdict(cfg), **{k: v for k, v in overrides.items() if v is not None}})
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise StudyError(f"reader_study.{field}: {err['msg']} (got {err.get('input')!r})") from None
    path = study_path(run_dir, name)
    pools = pools_from_run(run_dir, cfg)
    from common.runtime import sha256_file

    release = released_file(run_dir)
    tokens = create_study(path, pools, cfg, {"run": run_dir.name, "release_sha256": sha256_file(release)})
    links = {reader: f"{base_url.rstrip('/')}/r/{token}" for reader, token in tokens.items()}
    fd = os.open(path.parent / "links.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file keeps its mode otherwise
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{reader}\t{link}\n" for reader, link in links.items())
    return path, links
