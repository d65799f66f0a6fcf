"""Linear probe on Music2Latent2 features: how much of a labelling do the embeddings carry?

    python examples/mir_probe.py DATA_DIR --model CHECKPOINT [--features-dir FEATS] [--test-fraction 0.25]

DATA_DIR holds one folder per class (``DATA_DIR/<label>/**/*.wav``; the label is the top-level
folder name). Features come from ``music2latent2 features DATA_DIR -o FEATS --mono``: one .npy per
file of shape (K*dim, chunks); they are averaged over chunks to one vector per file, standardised
with training-set statistics, and a linear probe (ridge least-squares regression onto one-hot
labels, closed form, numpy only) is fitted on a stratified, seeded train/test split.
Prints train/test accuracy next to the majority-class baseline.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from music2latent2.audio import find_audio_files
from music2latent2.cli import main as cli_main


def count_labelled_files(data_dir: Path) -> Dict[str, int]:
    """Audio files per label (top-level sub-folder) under DATA_DIR; files directly in it have none."""
    counts: Dict[str, int] = {}
    for path in find_audio_files(data_dir):
        rel = path.relative_to(data_dir)
        if len(rel.parts) >= 2:
            counts[rel.parts[0]] = counts.get(rel.parts[0], 0) + 1
    return counts


def check_layout(data_dir: Path) -> str | None:
    """Why DATA_DIR cannot give a train/test split (checked before any feature is extracted), or None."""
    if not data_dir.is_dir():
        return f"{data_dir} is not a folder"
    counts = count_labelled_files(data_dir)
    usable = {label: n for label, n in counts.items() if n >= 2}
    if len(usable) < 2:
        found = ", ".join(f"{label}: {n}" for label, n in sorted(counts.items())) or "no audio in any sub-folder"
        return (f"{data_dir} needs one sub-folder per class, at least 2 classes with at least 2 audio files each "
                f"(DATA_DIR/<label>/**/*.wav); found {found}")
    return None


def load_features(features_dir: Path) -> Tuple[np.ndarray, List[str]]:
    """(files, K*dim) chunk-averaged features and each file's label (its top-level folder)."""
    xs, labels = [], []
    for path in sorted(features_dir.rglob("*.npy")):
        rel = path.relative_to(features_dir)
        if len(rel.parts) < 2:
            continue  # files directly in DATA_DIR have no label
        feats = np.load(path)  # (K*dim, chunks) for mono audio
        xs.append(feats.reshape(-1, feats.shape[-1]).mean(axis=-1))
        labels.append(rel.parts[0])
    if not xs:
        raise ValueError(f"no labelled feature files under {features_dir} (expected <label>/<file>.npy)")
    return np.stack(xs).astype(np.float32), labels


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): per class, a seeded shuffle, ``test_fraction`` of it (at least one
    item when the class has two or more) goes to the test set."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * test_fraction)) if len(idx) > 1 else 0
        n_test = min(max(n_test, 1 if len(idx) > 1 else 0), len(idx) - 1)
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.array(sorted(train)), np.array(sorted(test))


def fit_linear_probe(x: np.ndarray, y: np.ndarray, classes: int, ridge: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """Least-squares (ridge) linear classifier on one-hot targets: the closed-form linear probe.

    Args:
        x: (N, D) standardised features; y: (N,) class indices.

    Returns:
        (weights (D, classes), bias (classes,)); predict with ``argmax(x @ W + b)``.
    """
    targets = np.eye(classes)[y]  # (N, classes)
    x_mean, t_mean = x.mean(0), targets.mean(0)
    xc, tc = (x - x_mean).astype(np.float64), targets - t_mean
    n, d = xc.shape
    if d <= n:  # primal: (X^T X + r I) W = X^T T
        w = np.linalg.solve(xc.T @ xc + ridge * np.eye(d), xc.T @ tc)
    else:  # dual, cheaper with few files and many dims: W = X^T (X X^T + r I)^-1 T
        w = xc.T @ np.linalg.solve(xc @ xc.T + ridge * np.eye(n), tc)
    return w, t_mean - x_mean @ w


def run_probe(x: np.ndarray, labels: List[str], test_fraction: float = 0.25, seed: int = 0) -> Dict[str, float]:
    names = sorted(set(labels))
    y = np.array([names.index(label) for label in labels])
    train, test = stratified_split(y, test_fraction, seed)
    if len(test) == 0 or len(names) < 2:
        raise ValueError("need at least 2 classes and 2 files per class for a train/test split")
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6  # training statistics only: no test leakage
    xs = (x - mu) / sd
    w, b = fit_linear_probe(xs[train], y[train], len(names))
    pred = (xs @ w + b).argmax(-1)
    majority = np.bincount(y[train]).argmax()
    return {"classes": len(names), "train_files": len(train), "test_files": len(test),
            "train_accuracy": float((pred[train] == y[train]).mean()),
            "test_accuracy": float((pred[test] == y[test]).mean()),
            "majority_baseline": float((y[test] == majority).mean())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--model", required=True, help="manifest name or checkpoint file/directory")
    parser.add_argument("--device", default=None)
    parser.add_argument("--features-dir", default=None, help="keep features here (default: a temp dir)")
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    problem = check_layout(Path(args.data_dir))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        feats_dir = Path(args.features_dir or tmp)
        cmd = ["features", args.data_dir, "-o", str(feats_dir), "--model", args.model, "--mono"]
        if args.device:
            cmd += ["--device", args.device]
        status = cli_main(cmd)
        if status in (2, 130):  # usage error or interrupted: a probe on partial features would mislead
            return status
        x, labels = load_features(feats_dir)
    result = run_probe(x, labels, args.test_fraction, args.seed)
    print(f"{result['classes']} classes, {result['train_files']} train / {result['test_files']} test files: "
          f"train accuracy {result['train_accuracy']:.3f}, test accuracy {result['test_accuracy']:.3f} "
          f"(majority baseline {result['majority_baseline']:.3f})")
    return status  # 1 when some files failed (the probe covers the rest)


if __name__ == "__main__":
    sys.exit(main())
