"""Differential privacy: calibration with upper-bounding accountants, the site's ledger, the empirical audit."""

from .accounting import UPPER_BOUND_ACCOUNTANTS, AccountantError, DPPlan, calibrate, epsilon_for, noise_for_budget, warn_unsafe
from .ledger import LOCAL_LOG, BudgetExceeded, LedgerError, PrivacyLedger, PrivacyRefusal, reseal

__all__ = [
    "LOCAL_LOG", "UPPER_BOUND_ACCOUNTANTS", "AccountantError", "BudgetExceeded", "DPPlan", "LedgerError", "PrivacyLedger",
    "PrivacyRefusal", "calibrate", "epsilon_for", "noise_for_budget", "reseal", "warn_unsafe",
]
