"""Linear probes: how much of a labelling do fixed embeddings carry?

The standard way to judge a representation for MIR (paper, section V-5) is to freeze it, fit a
linear classifier on top and measure that classifier on held-out data. This module is that
classifier and its measures, with numpy arrays in and out and no dependency beyond torch:

- :func:`fit_logistic_probe`: multinomial logistic regression with an L2 penalty, on features
  standardised with the training statistics (so no test statistic leaks into the fit);
- :func:`macro_auc`: one-vs-rest ROC AUC averaged over classes, the number the paper reports;
- :func:`evaluate_probe`: pick the penalty on validation folds, refit on all training data,
  score the test set;
- :func:`stratified_split`: a seeded per-class train/test split.

``examples/mir_probe.py`` (folders of labelled audio) and ``benchmarks/mir_probe.py`` (rendered
TinySOL-like notes and chords) both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

__all__ = ["LinearProbe", "ProbeScore", "fit_logistic_probe", "fit_logistic_probes", "macro_auc", "stratified_split",
           "evaluate_probe", "L2_GRID"]

# Penalties tried by evaluate_probe, on standardised features (loss = mean cross-entropy + l2 * |W|^2).
L2_GRID: Tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class LinearProbe:
    """A fitted linear classifier: ``softmax(((x - mean) / scale) @ weight + bias)``.

    Attributes:
        weight: (D, classes); bias: (classes,); mean, scale: (D,) training-set statistics.
    """

    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N, classes) logits."""
        return ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.weight + self.bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N, classes) class probabilities."""
        z = self.logits(x)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N,) class indices."""
        return self.logits(x).argmax(axis=1)


def _check_xy(x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"features must be (N, D) and labels (N,) with N > 0; got {x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError("labels must be non-negative integer class indices")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinity")
    return x, y


def fit_logistic_probe(x: np.ndarray, y: np.ndarray, classes: int, l2: float = 1e-3,
                       max_iter: int = 300, in_row_span: bool = True) -> LinearProbe:
    """Multinomial logistic regression, fitted with L-BFGS in float64.

    Args:
        x: (N, D) features; y: (N,) class indices in ``0 .. classes - 1``.
        classes: number of classes (classes absent from ``y`` get a low bias, not an error).
        l2: penalty on the weights (not the bias), on standardised features.
        max_iter: L-BFGS iterations.
        in_row_span: with more features than rows, fit in the span of the rows (same optimum,
            much faster); False fits all D weights directly.
    """
    return fit_logistic_probes(x, y, classes, (l2,), max_iter, in_row_span)[0]


def fit_logistic_probes(x: np.ndarray, y: np.ndarray, classes: int, l2s: Sequence[float],
                        max_iter: int = 300, in_row_span: bool = True) -> List[LinearProbe]:
    """One :func:`fit_logistic_probe` per penalty in ``l2s``, fitted together.

    The objective is the sum of the independent per-penalty objectives, so its minimum is each
    one's minimum; one optimiser run serves them all, and the standardisation and row-span
    basis are computed once.
    """
    x, y = _check_xy(x, y)
    if y.max() >= classes:
        raise ValueError(f"label {int(y.max())} is out of range for {classes} classes")
    mean = x.mean(0, dtype=np.float64)
    scale = x.std(0, dtype=np.float64) + 1e-6  # a constant feature stays 0 instead of dividing by 0
    xs = torch.from_numpy((x - mean) / scale)  # (N, D) float64
    basis = None
    if in_row_span and xs.shape[1] > xs.shape[0]:
        # The penalised optimum's weights lie in the span of the training rows (the loss gradient
        # is xs^T (p - onehot), and the penalty only shrinks). With fewer rows than features,
        # fitting A in that r-dimensional span (W = V A, |W| = |A| as V is orthonormal) gives
        # the same probe for a fraction of the work.
        _, sv, vt = torch.linalg.svd(xs, full_matrices=False)
        basis = vt[sv > sv[0] * 1e-10].T  # (D, r)
        xs = xs @ basis  # (N, r)
    target = torch.from_numpy(y.astype(np.int64)).expand(len(l2s), -1)  # (G, N)
    penalty = torch.tensor(list(l2s), dtype=torch.float64)  # (G,)
    weight = torch.zeros(len(l2s), xs.shape[1], classes, dtype=torch.float64, requires_grad=True)  # (G, r, C)
    bias = torch.zeros(len(l2s), 1, classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = xs @ weight + bias  # (G, N, C)
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)  # (G,)
        loss = (ce + penalty * weight.pow(2).sum((1, 2))).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may sit inside torch.inference_mode()
        opt.step(closure)
    probes = []
    for g in range(len(l2s)):
        w = weight[g].detach() if basis is None else basis @ weight[g].detach()  # (D, classes)
        probes.append(LinearProbe(w.numpy(), bias[g, 0].detach().numpy(), mean, scale))
    return probes


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start index of each run of equal values, and the run each sorted position belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    run = np.cumsum(np.r_[True, sorted_values[1:] != sorted_values[:-1]]) - 1
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = ((starts + 1 + ends) / 2.0)[run]
    return ranks


def macro_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """One-vs-rest ROC AUC per class, averaged over the classes present in ``y``.

    AUC is the probability that a random positive scores above a random negative (ties count
    half), computed from ranks (the Mann-Whitney U statistic).

    Args:
        y: (N,) class indices; scores: (N, classes) probabilities or logits.

    Raises:
        ValueError: fewer than two classes present (no negatives to rank against).
    """
    y, scores = np.asarray(y), np.asarray(scores, np.float64)
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError("macro AUC needs at least two classes in the labels")
    aucs = []
    for c in present:
        positive = y == c
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        ranks = _average_ranks(scores[:, c])
        aucs.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs))


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): per class, a seeded shuffle; ``test_fraction`` of the class (at
    least one item when it has two or more, never all of it) goes to the test set."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    train: List[int] = []
    test: List[int] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = min(max(int(round(len(idx) * test_fraction)), 1), len(idx) - 1) if len(idx) > 1 else 0
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(test), dtype=np.int64)


@dataclass
class ProbeScore:
    """Test-set scores of one probe, and the penalty chosen for it."""

    accuracy: float
    macro_auc: float
    l2: float
    train_accuracy: float


def evaluate_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                   classes: int, validation: Sequence[Tuple[np.ndarray, np.ndarray]] = (),
                   l2_grid: Sequence[float] = L2_GRID, seed: int = 0, max_iter: int = 300) -> ProbeScore:
    """Choose the penalty on validation folds, refit on all training data, score the test set.

    Args:
        x_train, y_train / x_test, y_test: (N, D) features and (N,) class indices.
        classes: number of classes.
        validation: (train, validation) index pairs into the training set; the penalty with the
            lowest mean validation cross-entropy wins. Empty: one stratified 25 % split (``seed``).
            Pass group-wise folds (e.g. one soundfont held out) when items within a group are alike.
        l2_grid: penalties to try.
        max_iter: L-BFGS iterations per fit.
    """
    x_train, y_train = _check_xy(x_train, y_train)
    x_test, y_test = _check_xy(x_test, y_test)
    folds = list(validation) or [stratified_split(y_train, 0.25, seed)]
    losses = np.zeros(len(l2_grid))
    for tr, va in folds:
        for g, probe in enumerate(fit_logistic_probes(x_train[tr], y_train[tr], classes, l2_grid, max_iter)):
            p = probe.predict_proba(x_train[va])
            losses[g] += -np.log(np.clip(p[np.arange(len(va)), y_train[va]], 1e-12, None)).mean() / len(folds)
    best_l2 = float(l2_grid[int(np.argmin(losses))])
    probe = fit_logistic_probe(x_train, y_train, classes, best_l2, max_iter)
    return ProbeScore(accuracy=float((probe.predict(x_test) == y_test).mean()),
                      macro_auc=macro_auc(y_test, probe.predict_proba(x_test)), l2=best_l2,
                      train_accuracy=float((probe.predict(x_train) == y_train).mean()))
