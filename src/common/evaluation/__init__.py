"""Release evaluation, studies and audits (used by simulations and by the server's export gate)."""
