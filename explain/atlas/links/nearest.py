"""The concepts of other classes nearest to each concept of an atlas: cosine of the atoms (rows of ``W``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

#: neighbours listed per concept (the atlas format's "at most 5")
MAX_NEAREST = 5


def nearest_concepts(
    atoms: Tensor, owners: Tensor, k: int = MAX_NEAREST, chunk: int = 4096
) -> tuple[Tensor, Tensor]:
    """``(cosine [N, k'], neighbour [N, k'])``: for each atom (row of ``atoms`` [N, c], of class ``owners[i]``),
    the ``k' = min(k, N - 1)`` most similar atoms of OTHER classes, best first (``-inf``/``-1`` when fewer exist).

    Rows are compared ``chunk`` at a time, so memory grows with ``chunk x N``, not ``N^2``.
    """
    unit = F.normalize(atoms.float(), dim=1)
    k = min(k, max(atoms.shape[0] - 1, 0))
    cosines, neighbours = [], []
    for start in range(0, unit.shape[0], chunk):
        similarity = unit[start:start + chunk] @ unit.T
        similarity[owners[start:start + chunk, None] == owners[None, :]] = float("-inf")
        values, indices = similarity.topk(k, dim=1) if k else (similarity[:, :0], similarity[:, :0].long())
        indices[values == float("-inf")] = -1
        cosines.append(values)
        neighbours.append(indices)
    return torch.cat(cosines), torch.cat(neighbours)


def load_atoms(root: Path, folders: dict[int, str]) -> tuple[Tensor, Tensor, Tensor]:
    """``(atoms [N, c], owner class [N], concept id [N])`` of every class folder (``class -> "classes/0003"``)."""
    atoms, owners, ids = [], [], []
    for class_id, folder in sorted(folders.items()):
        bank = torch.load(Path(root) / folder / "dictionary.pt", map_location="cpu", weights_only=True)["atoms"]
        atoms.append(bank)
        owners += [class_id] * bank.shape[0]
        ids += list(range(bank.shape[0]))
    if not atoms:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(atoms), torch.tensor(owners), torch.tensor(ids)
