"""Weighted kNN classification of frozen features (the InstDisc / DINO monitor).

Cosine similarity on L2-normalized features; each of the k nearest neighbours votes for its
label with weight exp(sim / T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted labels of `queries` (QxD) from `bank` (NxD, labels N); features are normalized here."""
    queries, bank = F.normalize(queries.float(), dim=1), F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # QxK
        weights = (sim / temperature).exp()  # QxK
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    ks: tuple[int, ...] = (20, 200),
    temperature: float = 0.07,
) -> dict[int, float]:
    """Top-1 accuracy of the weighted kNN classifier for each k."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    return {
        k: float(
            (knn_predict(queries, bank, bank_labels, num_classes, k, temperature) == query_labels)
            .float()
            .mean()
        )
        for k in ks
    }
