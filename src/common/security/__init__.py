"""Keys, certificates and signatures (``cryptography``)."""
