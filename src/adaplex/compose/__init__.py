"""Composition: routing (per-sample keys into expert banks) and the registry of keys; it only produces weights."""
