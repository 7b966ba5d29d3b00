"""Local checks a hospital node runs before it trusts inputs or sends outputs."""

from __future__ import annotations

import torch

from common.checks import CheckFailed
from common.config import ConfigError, RunConfig, SiteConfig, site_path
from common.data import SiteData


def check_site_data(data: SiteData) -> None:
    """Local data must be finite, in [0, 1] and hold at least one training image."""
    for split, x in (("train", data.train_x), ("holdout", data.holdout_x)):
        if not torch.isfinite(x).all():
            raise CheckFailed(f"site {data.name}: {split} images hold NaN or inf")
        if len(x) and (x.min() < 0 or x.max() > 1):
            raise CheckFailed(f"site {data.name}: {split} images fall outside [0, 1]")
    if len(data.train_x) == 0:
        raise CheckFailed(f"site {data.name}: no training images")


def check_source(site: SiteConfig) -> None:
    """Before a node connects: its site's images are where its file says (one line naming the site
    file if not). A MedMNIST site's share depends on the run, so only the file is checked here."""
    from common.data.medmnist import DataError, locate

    where = site.origin or site.name
    if site.source.kind == "medmnist":
        try:
            locate(site.source)
        except DataError as exc:
            raise ConfigError(f"{where}: source: {exc}") from None
        return
    for field_name in ("root", "labels_csv"):
        value = getattr(site.source, field_name)
        if value and not site_path(site, value).exists():
            raise ConfigError(f"{where}: source.{field_name}: {site_path(site, value)} does not exist")


def preflight(run: RunConfig) -> None:
    """Before the first round (and before Ray starts): every site's data loads and passes
    :func:`check_site_data`, or a one-line error names the site and its file."""
    from common.data import load_site as load_site_data

    for site in run.sites:  # first every file: simulated hospitals share one pool
        check_source(site)
    for site in run.sites:
        try:
            check_site_data(load_site_data(run, site))
        except (CheckFailed, ValueError, OSError) as exc:
            raise ConfigError(f"{site.origin or site.name}: site {site.name}'s data cannot be used: {exc}") from None
