"""Data: locating files, partitioning across sites, acquisition profiles."""

from .acquisition import apply_profile
from .medmnist import DataError, locate
from .partition import holdout_split, label_skewed_partition
from .sites import SiteData, load_site

__all__ = ["DataError", "SiteData", "apply_profile", "holdout_split", "label_skewed_partition", "load_site", "locate"]
