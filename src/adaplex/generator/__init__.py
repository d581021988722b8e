"""The prompt-to-LoRA generator: checkpoint tokenizer (so far)."""
