"""Many simulated hospitals from one template: ``sites: [{generate: {n: 100, ...}}]`` in a run YAML.

Each generated site is an ordinary :class:`~common.config.SiteConfig` (written out in the run's
config.json like any other), so partitioning, ledgers, reports and ``--resume`` treat it as a
hospital of its own. Draws are seeded by (``seed``, site index): adding sites never changes
the earlier ones' scanners.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from .config import ConfigError, GeneratedSites, SiteConfig, load_site


def power_law_shares(n: int, power: float) -> list[float]:
    """Share of site k proportional to (k+1)^-power (Zipf): a few large hospitals, a long tail of small ones."""
    raw = (np.arange(n) + 1.0) ** -power
    return (raw / raw.sum()).tolist()


def generate_sites(spec: GeneratedSites, run_path: Path) -> list[SiteConfig]:
    template = load_site(Path(run_path).parent / spec.template)
    if template.role != "train":
        raise ConfigError(f"{template.origin}: a generate: template must be a training site (role: train)")
    width = max(3, len(str(spec.n - 1)))
    sites = []
    for k, share in enumerate(power_law_shares(spec.n, spec.size_power)):
        rng = np.random.default_rng([spec.seed, k])
        drawn = {name: float(rng.uniform(lo, hi)) for name, (lo, hi) in sorted(spec.acquisition.items())}
        privacy = template.privacy
        try:
            if spec.epsilon:
                privacy = dataclasses.replace(privacy, epsilon=float(spec.epsilon[k % len(spec.epsilon)]))
            sites.append(dataclasses.replace(
                template,
                name=f"{spec.prefix}_{k:0{width}d}",
                description=f"simulated hospital {k + 1} of {spec.n} (from {Path(template.origin).name})",
                share=share,
                acquisition=dataclasses.replace(template.acquisition, **drawn, seed=spec.seed * 100_003 + k),
                privacy=privacy,
                state_dir=None,  # a simulated site keeps its ledger in the run folder
            ))
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(f"{run_path}: sites: generate: site {k}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return sites
