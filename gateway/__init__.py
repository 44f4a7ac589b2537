"""hq.gateway: OEHASHEQUIV 1.1, BitBake's own protocol, in front of an hq broker (hq-gateway)."""
