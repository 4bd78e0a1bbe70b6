"""The dispatcher's receiver side without processes: the combined row of a request, and fusion's representatives."""

from __future__ import annotations

import torch

from real_backend.dist import Dispatcher, fuse_tokens


class _Store:
    """Expert e of any layer multiplies by e + 1 and adds e (distinct, not linear)."""

    def compute(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        return x * (e + 1) + e


def test_receiver_returns_the_gate_weighted_sum_of_a_rows_experts():
    disp = Dispatcher(0, 2, _Store(), None, torch.device("cpu"), torch.device("cpu"))
    x = torch.randn(3, 5)
    ids = torch.tensor([[2, 5], [-1, 1], [3, -1]], dtype=torch.int32)
    w = torch.tensor([[0.7, 0.3], [0.0, 0.6], [0.2, 0.0]])
    y = disp._combine(0, x, ids, w)
    want = torch.stack([0.7 * (x[0] * 3 + 2) + 0.3 * (x[0] * 6 + 5), 0.6 * (x[1] * 2 + 1), 0.2 * (x[2] * 4 + 3)])
    torch.testing.assert_close(y, want)


def test_fusion_representative_is_the_row_that_absorbs_the_others():
    torch.manual_seed(0)
    x = torch.randn(9, 4)
    x[2] = x[1] + 1e-3  # a-token 2 merges into b-token 1 (its best match by far)
    rows, row_of, rep = fuse_tokens(x, 0.2, None)
    assert rows.shape[0] == 8 and rep.shape[0] == 8
    torch.testing.assert_close(row_of[rep], torch.arange(8))  # each row's representative maps to it
    assert row_of[2] == row_of[1] and int(rep[row_of[1]]) == 1
    torch.testing.assert_close(rows[row_of[1]], (x[1] + x[2]) / 2)
    alone = torch.ones(9, dtype=torch.bool)
    alone[[1, 2]] = False
    torch.testing.assert_close(rows[row_of[alone]], x[alone])
