"""Differential privacy: calibration with upper-bounding accountants, the site's ledger, the empirical audit."""

from .accounting import UPPER_BOUND_ACCOUNTANTS, AccountantError, DPPlan, calibrate, epsilon_for, noise_for_budget, warn_unsafe
from .ledger import BudgetExceeded, LedgerError, PrivacyLedger, PrivacyRefusal, reseal

__all__ = [
    "UPPER_BOUND_ACCOUNTANTS", "AccountantError", "BudgetExceeded", "DPPlan", "LedgerError", "PrivacyLedger",
    "PrivacyRefusal", "calibrate", "epsilon_for", "noise_for_budget", "reseal", "warn_unsafe",
]
