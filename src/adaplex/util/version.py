"""The adaplex version, recorded in every file it writes (pyproject.toml states the same)."""

VERSION = "0.1.0"
