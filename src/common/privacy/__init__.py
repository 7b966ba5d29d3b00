"""Differential privacy: run-level noise calibration and the persisted per-site ledger."""

from .accounting import DPPlan, calibrate, warn_unsafe
from .ledger import BudgetExceeded, PrivacyLedger

__all__ = ["BudgetExceeded", "DPPlan", "PrivacyLedger", "calibrate", "warn_unsafe"]
