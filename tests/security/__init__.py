"""Replays of the attacks in issue 12, each asserting its defence."""
