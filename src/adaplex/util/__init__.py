"""Utilities every layer may use: name matching, YAML configs, timing and memory measurement, the version."""
