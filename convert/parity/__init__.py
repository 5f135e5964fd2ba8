"""Parity with PyTorch: the timm / transformers references (`references`), one forward pass compared
(`forward`, `python main.py parity`), and N training updates compared (`training`, `parity --train`:
the JAX side through the jobs' own skeleton, the PyTorch side in `sides` and `torch_training`)."""
