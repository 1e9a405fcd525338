"""Pictures and tables people look at: confusion matrices and learning curves (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure


def confusion_matrix(
    targets: npt.NDArray[np.integer[Any]], predicted: npt.NDArray[np.integer[Any]], n_classes: int
) -> npt.NDArray[np.int64]:
    """(C, C) counts: rows are true classes, columns predicted ones."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (targets, predicted), 1)
    return matrix


def confusion_figure(matrix: npt.NDArray[np.integer[Any]], classes: Sequence[str], title: str) -> Figure:
    figure = Figure(figsize=(1.0 + 0.6 * len(classes), 0.8 + 0.6 * len(classes)))
    ax = figure.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > matrix.max() / 2 else "black")  # fmt: skip
    figure.tight_layout()
    return figure


def learning_curve_figure(labels: Sequence[int], accuracy: Sequence[float], title: str) -> Figure:
    figure = Figure(figsize=(5, 3.5))
    ax = figure.subplots()
    ax.plot(labels, accuracy, marker="o")
    ax.set_xlabel("labels")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def per_class_counts(labels: Sequence[str], classes: Sequence[str]) -> dict[str, int]:
    counts = dict.fromkeys(classes, 0)
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return counts
