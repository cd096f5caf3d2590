"""A synthetic task that experts can specialise on: clustered inputs, one rule per cluster."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_lab._checks import finite_float, positive_int


@dataclass
class ClusteredTask:
    """Train/test splits: inputs ``(N, input_size)`` float32, labels and cluster ids ``(N,)``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    cluster_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    cluster_test: torch.Tensor
    num_clusters: int
    num_classes: int

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_test, self.y_test


def make_clustered_task(n_train: int = 4000, n_test: int = 1000, *, num_clusters: int = 4,
                        input_size: int = 16, num_classes: int = 4, separation: float = 3.0,
                        seed: int = 0) -> ClusteredTask:
    """Inputs come from ``num_clusters`` Gaussian clusters; each cluster labels its points
    with its own random linear rule, ``y = argmax(R_c (x - mu_c))``.

    No single linear classifier can follow every cluster's rule, but a mixture of linear
    experts can: the gate recognises the cluster and each expert learns one rule. Same
    ``seed``, same data. ``separation`` scales the distance between cluster centres.
    """
    for name, value in [("n_train", n_train), ("n_test", n_test), ("num_clusters", num_clusters),
                        ("input_size", input_size), ("num_classes", num_classes)]:
        positive_int(name, value)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    finite_float("separation", separation, minimum=0.0)
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_clusters, input_size, generator=generator) * separation
    rules = torch.randn(num_clusters, num_classes, input_size, generator=generator)

    def sample(n: int):
        cluster = torch.randint(num_clusters, (n,), generator=generator)
        offset = torch.randn(n, input_size, generator=generator)
        scores = torch.einsum("ncd,nd->nc", rules[cluster], offset)
        return centres[cluster] + offset, scores.argmax(dim=1), cluster

    x_train, y_train, c_train = sample(n_train)
    x_test, y_test, c_test = sample(n_test)
    return ClusteredTask(x_train, y_train, c_train, x_test, y_test, c_test, num_clusters, num_classes)


def group_into_sequences(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, tokens: int,
                         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrange examples into sequences of ``tokens`` examples of the same group, for a per-token task.

    ``x`` ``(N, d)``, ``y`` ``(N,)`` and ``groups`` ``(N,)`` (e.g. the cluster ids of
    :func:`moe_lab.data.make_clustered_task`). Within each group the examples are cut into
    full sequences (a group's remainder is dropped); the sequences are then shuffled with
    ``seed``. Returns ``(xs (M, tokens, d), ys (M, tokens))``.
    """
    positive_int("tokens", tokens)
    if not (len(x) == len(y) == len(groups)):
        raise ValueError(f"x, y and groups must have the same length, got {len(x)}, {len(y)}, {len(groups)}")
    xs, ys = [], []
    for g in torch.unique(groups):
        members = torch.nonzero(groups == g).squeeze(1)
        members = members[:len(members) // tokens * tokens]
        xs.append(x[members].reshape(-1, tokens, *x.shape[1:]))
        ys.append(y[members].reshape(-1, tokens))
    xs, ys = torch.cat(xs), torch.cat(ys)
    if len(xs) == 0:
        raise ValueError(f"no group has {tokens} examples: no full sequence can be made")
    order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed))
    return xs[order], ys[order]
