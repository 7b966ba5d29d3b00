"""Data: locating files, partitioning across sites, acquisition profiles."""

from .acquisition import apply_profile
from .medmnist import DataError, locate
from .partition import holdout_split, label_skewed_partition
from .sites import PublicData, SiteData, load_public, load_site

__all__ = ["DataError", "PublicData", "SiteData", "apply_profile", "holdout_split", "label_skewed_partition", "load_public", "load_site", "locate"]
