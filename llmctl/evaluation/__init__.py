"""Metrics and the backends that compute them."""
