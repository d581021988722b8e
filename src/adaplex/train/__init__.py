"""Training on PyTorch Lightning."""
