"""Jinja2 templates shared by the dashboard and the reader app (autoescaped, with number filters)."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import jinja2
from fastapi.templating import Jinja2Templates


def fmt(v, digits: int = 4) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"[{fmt(v[0], digits)}, {fmt(v[1], digits)}]"
    return str(v)


def signed(v) -> str:
    return "–" if v is None else f"{v:+.4g}"


def when(ts) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "–"


env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True)
env.filters.update(fmt=fmt, signed=signed, when=when)
templates = Jinja2Templates(env=env)
