"""Weighted k-NN classification of frozen features: DINO's protocol (Caron et al., 2021, `eval_knn.py`).

Features are L2-normalised; each test feature's `k` nearest training features by cosine
similarity vote for their labels with weights exp(sim / T); the classes are ranked by
their summed votes, giving Acc@1 and Acc@5. Nothing is trained, so the figure has no
seed: it measures the features alone, which is why the masking ablation reports it
beside the linear probe. With a very large T every vote weighs 1 (a plain majority,
ties to the smallest class id, as scikit-learn's `KNeighborsClassifier`).

The similarities run in chunks of test rows on the default device, so a training set
of ImageNet's size fits next to one chunk's [chunk, N_train] similarity matrix.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class KnnResult(NamedTuple):
    acc1: float  # percent
    acc5: float  # percent (100 with fewer than 5 classes in the training set)
    count: int  # test features scored


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    features = np.asarray(features, np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _votes(train: jax.Array, train_labels: jax.Array, test: jax.Array, k: int, temperature: float,
           num_classes: int) -> jax.Array:
    """[chunk, num_classes] summed vote weights of each test row's k nearest training rows."""
    similarity, index = jax.lax.top_k(jnp.matmul(test, train.T, precision="highest"), k)  # float32 on TPUs too
    weights = jnp.exp((similarity - 1.0) / temperature)  # exp(sim / T) up to a per-row factor: no overflow at small T
    one_hot = jax.nn.one_hot(train_labels[index], num_classes, dtype=jnp.float32)
    return jnp.einsum("nk,nkc->nc", weights, one_hot)


def knn_votes(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, *, k: int = 20,
              temperature: float = 0.07, chunk: int = 256) -> np.ndarray:
    """Per test row, the classes' summed vote weights [N_test, num_classes] (features normalised here).

    The weights are exp((sim - 1) / T): DINO's exp(sim / T) times exp(-1 / T), the same
    ranking for every row, without overflowing float32 at small T.
    """
    if not 1 <= k <= len(train_features):
        raise ValueError(f"--k {k} must be between 1 and the {len(train_features)} training features")
    if temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {temperature}")
    if train_features.shape[1:] != test_features.shape[1:]:
        raise ValueError(f"training features of width {train_features.shape[1:]} and test features of width "
                         f"{test_features.shape[1:]} come from different encoders")
    num_classes = int(np.max(train_labels)) + 1
    train = jnp.asarray(l2_normalize(train_features))
    labels = jnp.asarray(train_labels, jnp.int32)
    test = l2_normalize(test_features)
    votes = [np.asarray(_votes(train, labels, jnp.asarray(test[i : i + chunk]), k, float(temperature), num_classes))
             for i in range(0, len(test), chunk)]
    return np.concatenate(votes) if votes else np.zeros((0, num_classes), np.float32)


def knn_classify(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, *, k: int = 20,
                 temperature: float = 0.07) -> np.ndarray:
    """The predicted class of each test row (the top vote; ties to the smallest class id)."""
    return np.argmax(knn_votes(train_features, train_labels, test_features, k=k, temperature=temperature), axis=1)


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, *, k: int = 20, temperature: float = 0.07) -> KnnResult:
    """Acc@1 and Acc@5 (percent) of the weighted k-NN vote on the test features."""
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError("k-NN scores one vector per image (features of --tokens cls or mean), not patch-token maps")
    for split, labels in (("training", train_labels), ("test", test_labels)):
        if len(labels) and np.min(labels) < 0:
            raise ValueError(f"the {split} features have no labels (images without class folders): k-NN scores "
                             "labelled features")
    votes = knn_votes(train_features, train_labels, test_features, k=k, temperature=temperature)
    # A stable sort of the negated votes ranks equal votes by class id, as argmax does.
    ranked = np.argsort(-votes, axis=1, kind="stable")[:, :5]
    labels = np.asarray(test_labels)[:, None]
    count = len(labels)
    hit1 = (ranked[:, :1] == labels).any(1).sum()
    hit5 = (ranked == labels).any(1).sum()
    return KnnResult(100.0 * hit1 / max(count, 1), 100.0 * hit5 / max(count, 1), count)
