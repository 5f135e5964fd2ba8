"""Presets, one file per experiment: `get_config()` returns the job's config dataclass.

A package so that an installed `semmae` (a wheel as well as `pip install -e .`) ships the
same presets as the checkout; `semmae_jax.config` finds them through the import system.
"""
