"""Using a trained model: encoder features of a dataset, their k-NN accuracy, and pictures of what
the model reconstructs and of how SemMAE masks. The commands over them are in `semmae_jax.jobs`."""
