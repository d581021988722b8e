"""Attention fault injection (bit flips) and detection (invariant and checksum checks)."""
