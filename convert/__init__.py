"""PyTorch <-> Flax checkpoint conversion for MAE / SemMAE models."""
