"""Linear probe on Music2Latent2 features: how much of a labelling do the embeddings carry?

    python examples/mir_probe.py DATA_DIR [--model CHECKPOINT] [--features-dir FEATS] [--test-fraction 0.25]

DATA_DIR holds one folder per class (``DATA_DIR/<label>/**/*.wav``; the label is the top-level
folder name). Features come from ``music2latent2 features DATA_DIR -o FEATS --mono --clip``: one
.npy per file of shape (1, K*dim), the per-chunk features averaged with each chunk weighted by its
share of real audio (the zero padding of the last chunk gets no vote); standardised with
training-set statistics, and a linear probe (multinomial logistic regression,
:mod:`music2latent2.probe`, its L2 penalty chosen on a validation split of the training files)
is fitted on a stratified, seeded train/test split. Prints train/test accuracy and the test
macro AUC (one-vs-rest ROC AUC averaged over classes) next to the majority-class baseline.
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
from music2latent2.probe import evaluate_probe, stratified_split


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
    """(files, K*dim) clip features and each file's label (its top-level folder)."""
    xs, labels = [], []
    for path in sorted(features_dir.rglob("*.npy")):
        rel = path.relative_to(features_dir)
        if len(rel.parts) < 2:
            continue  # files directly in DATA_DIR have no label
        feats = np.load(path)  # (1, K*dim): --mono --clip
        xs.append(feats.reshape(-1, feats.shape[-1]).mean(axis=0))
        labels.append(rel.parts[0])
    if not xs:
        raise ValueError(f"no labelled feature files under {features_dir} (expected <label>/<file>.npy)")
    return np.stack(xs).astype(np.float32), labels


def run_probe(x: np.ndarray, labels: List[str], test_fraction: float = 0.25, seed: int = 0) -> Dict[str, float]:
    """Fit and score a logistic probe on a stratified split: accuracies, macro AUC, baseline."""
    names = sorted(set(labels))
    y = np.array([names.index(label) for label in labels])
    train, test = stratified_split(y, test_fraction, seed)
    if len(test) == 0 or len(names) < 2:
        raise ValueError("need at least 2 classes and 2 files per class for a train/test split")
    score = evaluate_probe(x[train], y[train], x[test], y[test], len(names), seed=seed)
    majority = np.bincount(y[train]).argmax()
    return {"classes": len(names), "train_files": len(train), "test_files": len(test),
            "train_accuracy": score.train_accuracy, "test_accuracy": score.accuracy,
            "test_macro_auc": score.macro_auc, "majority_baseline": float((y[test] == majority).mean())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--model", default=None,
                        help="manifest name, checkpoint file/directory or Hub repo id (default: the bundled model)")
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
        cmd = ["features", args.data_dir, "-o", str(feats_dir), "--mono", "--clip"]
        if args.model:
            cmd += ["--model", args.model]
        if args.device:
            cmd += ["--device", args.device]
        status = cli_main(cmd)
        if status in (2, 130):  # usage error or interrupted: a probe on partial features would mislead
            return status
        x, labels = load_features(feats_dir)
    result = run_probe(x, labels, args.test_fraction, args.seed)
    print(f"{result['classes']} classes, {result['train_files']} train / {result['test_files']} test files: "
          f"train accuracy {result['train_accuracy']:.3f}, test accuracy {result['test_accuracy']:.3f}, "
          f"test macro AUC {result['test_macro_auc']:.3f} "
          f"(majority baseline accuracy {result['majority_baseline']:.3f})")
    return status  # 1 when some files failed (the probe covers the rest)


if __name__ == "__main__":
    sys.exit(main())
