"""Applications: the demo that `make demo` runs, and the preparation of real-text data."""
