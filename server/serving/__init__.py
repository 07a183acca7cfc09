"""Serving: the gRPC services and their assembly, auth, validation, the ledger (the single
writer), the live state and the Prometheus collector."""
