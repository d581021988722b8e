"""The engine: weight kinds, the stack, adapted layers and attention, model-family knowledge, the handle."""
