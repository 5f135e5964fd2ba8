"""TensorFlow, as the input pipeline uses it: on the CPU only.

Every data module imports `tf` from here, so the GPUs are hidden from TensorFlow once,
when it is first imported and before any op could have touched them (TensorFlow
otherwise grabs GPU memory that JAX needs). Nothing else changes TensorFlow's global
state.
"""

from __future__ import annotations

import logging

import tensorflow as tf

log = logging.getLogger(__name__)


def _hide_gpus() -> None:
    """Keep TensorFlow on the CPU (only possible before TF first initialises its devices)."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # devices already initialised, e.g. by an eager op before this import
        if tf.config.get_visible_devices("GPU"):
            log.warning("TensorFlow already holds a GPU; the input pipeline may take accelerator memory")


_hide_gpus()

__all__ = ["tf"]
