"""Weighted kNN on cases with known answers."""

import pytest
import torch

from training.knn import knn_accuracy, knn_predict


def test_nearest_neighbour_on_the_axes():
    bank = torch.eye(3)
    labels = torch.tensor([0, 1, 2])
    queries = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 1.0], [0.1, 1.0, 0.3]])
    assert knn_predict(queries, bank, labels, 3, k=1).tolist() == [0, 2, 1]


def test_votes_are_weighted_by_similarity_and_temperature():
    # one very close neighbour of class 1 against two farther ones of class 0
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([1, 0, 0])
    q = torch.tensor([[1.0, 0.0]])
    assert knn_predict(q, bank, labels, 2, k=3, temperature=0.07).tolist() == [
        1
    ]  # exp(1/T) dominates
    assert knn_predict(q, bank, labels, 2, k=3, temperature=100.0).tolist() == [
        0
    ]  # nearly a plain vote


def test_accuracy_per_k_and_k_larger_than_the_bank():
    torch.manual_seed(0)
    centers = torch.randn(4, 16) * 5
    bank_labels = torch.arange(4).repeat_interleave(10)
    bank = centers[bank_labels] + torch.randn(40, 16)
    q_labels = torch.arange(4).repeat_interleave(5)
    queries = centers[q_labels] + torch.randn(20, 16)
    acc = knn_accuracy(queries, q_labels, bank, bank_labels, ks=(1, 20, 200))
    assert acc[1] == pytest.approx(1.0) and acc[20] == pytest.approx(1.0)
    assert set(acc) == {1, 20, 200}
    wrong = knn_accuracy(queries, (q_labels + 1) % 4, bank, bank_labels, ks=(5,))
    assert wrong[5] == pytest.approx(0.0)
