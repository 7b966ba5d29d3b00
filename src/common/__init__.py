"""fedsynth shared library: data, models, privacy, metrics, config, reporting."""

__version__ = "0.1.0"
