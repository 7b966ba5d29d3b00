"""fedsynth ServerApp: FedAvg with a privacy ledger, checkpoints and synthesis."""
