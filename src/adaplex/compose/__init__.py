"""Composition: routing (per-sample keys into expert banks) and the registry of routing keys; it only produces weights."""
