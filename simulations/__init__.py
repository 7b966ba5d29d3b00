"""Multi-site simulation: configs (``*.yaml``) and the ``fedsynth`` entry points."""
