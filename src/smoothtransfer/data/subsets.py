"""Deterministic index subsets: k-shot training sets, stratified held-out validation, certification picks.

All functions return sorted indices into the dataset they were given, so the result is a pure function of
``(targets, arguments, seed)`` and independent of torch's global RNG state.
"""

from __future__ import annotations

import torch

from smoothtransfer.errors import UserError


def _as_targets(targets) -> torch.Tensor:
    t = torch.as_tensor(targets).to("cpu")
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise UserError(f"targets must be a 1-D integer sequence, got {t.dtype} of shape {tuple(t.shape)}")
    if len(t) and int(t.min()) < 0:
        raise UserError("targets must be >= 0")
    return t.long()


def _class_permutations(t: torch.Tensor, seed: int) -> dict[int, torch.Tensor]:
    """``{class: indices of that class in a seeded random order}``; classes visited in increasing order.

    The permutation of each class does not depend on k, so k-shot sets are nested: the 5-shot set is a
    subset of the 10-shot set for the same seed.
    """
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for c in torch.unique(t).tolist():
        idx = torch.nonzero(t == c, as_tuple=True)[0]
        out[c] = idx[torch.randperm(len(idx), generator=g)]
    return out


def k_shot_indices(targets, k: int, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """k examples of every class, chosen at random with a fixed seed.

    Args:
        targets: ``(N,)`` integer labels.
        k: examples per class (>= 1).
        seed: the draw is a function of ``(targets, k, seed)`` only.
        num_classes: if given, classes ``0..num_classes-1`` must all be present (an absent class is an error
            instead of silently giving a k-shot set with fewer classes).

    Returns:
        sorted LongTensor ``(num_classes * k,)``.
    """
    t = _as_targets(targets)
    if int(k) != k or k < 1:
        raise UserError(f"k (shots per class) must be an integer >= 1, got {k}")
    perms = _class_permutations(t, seed)
    if num_classes is not None:
        missing = sorted(set(range(num_classes)) - set(perms))
        if missing:
            raise UserError(f"k-shot: class {missing[0]} has no examples ({len(missing)} classes missing)")
    short = [(c, len(p)) for c, p in perms.items() if len(p) < k]
    if short:
        c, n = short[0]
        raise UserError(f"k-shot: class {c} has only {n} examples, fewer than k={k}"
                        + (f" ({len(short)} classes short)" if len(short) > 1 else ""))
    if not perms:
        return torch.zeros(0, dtype=torch.long)
    return torch.sort(torch.cat([p[:k] for p in perms.values()])).values


def train_val_split(targets, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split into disjoint ``(train_idx, val_idx)``, both sorted LongTensors.

    Each class with n examples puts ``round(val_fraction * n)`` in validation, clamped to ``[1, n-1]`` when
    n >= 2 so both sides see every class; a class with a single example stays in train.
    """
    t = _as_targets(targets)
    if not 0.0 < float(val_fraction) < 1.0:
        raise UserError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    train, val = [], []
    for perm in _class_permutations(t, seed).values():
        n = len(perm)
        n_val = min(max(round(val_fraction * n), 1), n - 1) if n >= 2 else 0
        val.append(perm[:n_val])
        train.append(perm[n_val:])
    empty = torch.zeros(0, dtype=torch.long)
    train_idx = torch.sort(torch.cat(train)).values if train else empty
    val_idx = torch.sort(torch.cat(val)).values if val else empty
    return train_idx, val_idx


def evenly_spaced(n_total: int, skip: int = 1, max: int | None = -1) -> list[int]:
    """Indices ``0, skip, 2*skip, ...`` below ``n_total``, at most ``max`` of them (``-1``/None: all).

    This is Cohen et al.'s ``certify.py --skip/--max`` selection, with ``max`` counting selected images
    (``list(range(0, n_total, skip))[:max]``); their script compares ``max`` with the dataset index instead.
    """
    if int(skip) != skip or skip < 1:
        raise UserError(f"skip must be an integer >= 1, got {skip}")
    if n_total < 0:
        raise UserError(f"n_total must be >= 0, got {n_total}")
    idx = list(range(0, int(n_total), int(skip)))
    if max is None or max == -1:
        return idx
    if int(max) != max or max < 0:
        raise UserError(f"max must be an integer >= 0, or -1 for all, got {max}")
    return idx[: int(max)]


__all__ = ["evenly_spaced", "k_shot_indices", "train_val_split"]
