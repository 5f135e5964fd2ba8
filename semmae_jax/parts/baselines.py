"""The parts the learned ones are measured against, computed on the same frozen backbone.

* k-means of patch tokens: one k-means (sklearn, k-means++ starts) fitted on the patch
  tokens of the training images and applied to the evaluated ones, so that a cluster id
  means the same in every image, as a learned part does; k = the learner's map count.
* raw attention, the paper's "raw iBOT attention" parts: each patch goes to the head of
  the last block whose attention from the cls token to it is the largest.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans


def fit_kmeans(tokens: np.ndarray, num_clusters: int, seed: int = 0, max_tokens: int = 200_000) -> KMeans:
    """k-means of patch tokens [..., D]; at most `max_tokens` of them (a seeded random subset) are used."""
    flat = np.asarray(tokens, np.float32).reshape(-1, tokens.shape[-1])
    if len(flat) > max_tokens:
        flat = flat[np.random.default_rng(seed).choice(len(flat), max_tokens, replace=False)]
    return KMeans(num_clusters, n_init=4, random_state=seed).fit(flat)


def kmeans_parts(kmeans: KMeans, tokens: np.ndarray) -> np.ndarray:
    """Cluster ids [N, L] of patch tokens [N, L, D]."""
    n, length, dim = tokens.shape
    return kmeans.predict(np.asarray(tokens, np.float32).reshape(-1, dim)).reshape(n, length)


def attention_parts(cls_attention: np.ndarray) -> np.ndarray:
    """Head ids [N, L] of the largest last-block cls attention [N, H, L]."""
    return np.asarray(cls_attention).argmax(axis=1)
