"""semmae-jax: SemMAE (semantic-guided masking for masked autoencoders) in JAX/Flax."""

__version__ = "0.1.0"
