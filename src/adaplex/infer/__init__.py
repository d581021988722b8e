"""Inference: generation, side-by-side comparison, perplexity, routed batch inference across workers."""
