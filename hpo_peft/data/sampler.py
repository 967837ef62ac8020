"""The few-shot sampler: which images of the training pool a seed draws, for any format.

Without groups, each class's rows are permuted (numpy's generator) or taken in the course
notebook's order. With a `group` column (`data.group_column`: slide or patient) and something held
out (holdout's validation images, or k-fold's folds), whole groups are dealt to one side, so one
group's images are never on both sides of a split.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd

from hpo_peft.core.errors import UserError

DEALS = 64  # group orders tried before a draw is refused: a greedy deal can miss a feasible split


def course_order(table: pd.DataFrame, seed: int) -> list[int]:
    """The course notebook's order of `table`'s rows (positions): its rows in table order shuffled
    by Python's `random` seeded with `seed` (a private `random.Random(seed)`: the same sequence as
    `random.seed(seed); random.shuffle(...)`, without touching the global state)."""
    positions = list(range(len(table)))
    random.Random(seed).shuffle(positions)
    return positions


def _check_counts(table: pd.DataFrame, categories: list[str], shots: int, val_shots: int, source: Path) -> None:
    needed = shots + val_shots
    for label, category in enumerate(categories):
        count = int((table["label"] == label).sum())
        if count < needed:
            wanted = f"shots + val_shots = {shots} + {val_shots} = {needed}" if val_shots else f"shots = {shots}"
            raise UserError(f"{source}: class {category!r} has {count} usable rows, but {wanted} are needed")


def sample_few_shot(
    table: pd.DataFrame, categories: list[str], shots: int, val_shots: int, seed: int, source: Path,
    sampler: str = "package", folds: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """K training and K_val validation rows per class, disjoint, deterministic for a seed (K_val may be 0).
    `package`: a permutation of each class's rows from numpy's generator. `course`: the course's
    order (`course_order`): the K shots are the notebook's, the K_val the next ones of each class.
    With a `group` column, K_val > 0 or `folds` >= 2 (k-fold inside the shots): `sample_by_group`."""
    if "group" in table.columns and (val_shots or folds > 1):
        if sampler == "course":
            raise UserError("data.group_column: the course's sampler draws the notebook's images whatever their "
                            "groups; use data.sampler: package to keep each group on one side of a split")
        return sample_by_group(table, categories, shots, val_shots, seed, source, folds)
    _check_counts(table, categories, shots, val_shots, source)
    rng = np.random.default_rng(seed)
    shuffled = course_order(table, seed) if sampler == "course" else None
    labels = table["label"].to_numpy()
    train_parts, val_parts = [], []
    for label, category in enumerate(categories):
        rows = table[table["label"] == label]
        needed = shots + val_shots
        if shuffled is None:
            order = rng.permutation(len(rows))
            rows_in_order = rows.iloc[order]
        else:
            rows_in_order = table.iloc[[p for p in shuffled if labels[p] == label]]
        train_parts.append(rows_in_order.iloc[:shots])
        val_parts.append(rows_in_order.iloc[shots:needed])
    return pd.concat(train_parts, ignore_index=True), pd.concat(val_parts, ignore_index=True)


def _deal(counts: np.ndarray, quotas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Groups (rows of `counts`, images per class) dealt in turn to the side that still needs the
    most of what the group has (ties: the side that needs most in all); a group no side needs stays
    out. Returns each group's side (-1: out) and the images per side and class."""
    have = np.zeros((len(quotas), counts.shape[1]), dtype=int)
    side_of = np.full(len(counts), -1)
    for g, group in enumerate(counts):
        missing = np.maximum(quotas[:, None] - have, 0)
        gain = np.minimum(group[None, :], missing).sum(axis=1)
        if gain.max() == 0:
            continue
        best = max(range(len(quotas)), key=lambda s: (gain[s], missing[s].sum(), -s))
        side_of[g] = best
        have[best] += group
    return side_of, have


def sample_by_group(table: pd.DataFrame, categories: list[str], shots: int, val_shots: int, seed: int,
                    source: Path, folds: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Holdout (K_val > 0): the groups split into a training and a validation side, K and K_val
    images per class drawn from each. k-fold (K_val = 0): the groups dealt into `folds` sides, the
    i-th shot of each class drawn from side i % folds; `validation.fold_of` puts the i-th shot of
    a class in fold i % folds, so every fold is whole groups."""
    _check_counts(table, categories, shots, val_shots, source)
    quotas = np.array([shots, val_shots] if val_shots else [len(range(f, shots, folds)) for f in range(folds)])
    labels, groups = table["label"].to_numpy(), table["group"].astype(str).to_numpy()
    names, group_index = np.unique(groups, return_inverse=True)
    counts = np.zeros((len(names), len(categories)), dtype=int)
    np.add.at(counts, (group_index, labels), 1)
    rng = np.random.default_rng(seed)
    for _ in range(DEALS):
        order = rng.permutation(len(names))
        dealt, have = _deal(counts[order], quotas)
        if (have >= quotas[:, None]).all():
            break
    else:
        short = int(np.argmin((have - quotas[:, None]).min(axis=0)))
        spread = int((counts[:, short] > 0).sum())
        wanted = (f"shots + val_shots = {shots} + {val_shots}" if val_shots else f"shots = {shots} in {folds} folds")
        raise UserError(f"{source}: cannot draw {wanted} per class with each group (data.group_column) on one side: "
                        f"class {categories[short]!r} has {int(counts[:, short].sum())} usable rows in "
                        f"{spread} group{'s' * (spread != 1)}; use fewer shots, holdout images or folds, or more groups")
    side_of = np.full(len(names), -1)
    side_of[order] = dealt
    row_side = side_of[group_index]
    picks = [[table.iloc[rng.permutation(np.flatnonzero((labels == c) & (row_side == s)))[:quota]]
              for c in range(len(categories))] for s, quota in enumerate(quotas)]
    if val_shots:
        return (pd.concat(picks[0], ignore_index=True), pd.concat(picks[1], ignore_index=True))
    train = [pd.concat([picks[i % folds][c].iloc[[i // folds]] for i in range(shots)]) for c in range(len(categories))]
    return pd.concat(train, ignore_index=True), table.iloc[[]].reset_index(drop=True)
