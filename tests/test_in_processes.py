"""conftest.in_processes: results in rank order, and a child's failure reported with its rank and cause."""
import os

import pytest

from conftest import in_processes


def _sum_of_ranks(rank, world, offset):
    import torch
    import torch.distributed as dist

    x = torch.tensor([float(rank + offset)])
    dist.all_reduce(x)
    return rank, world, torch.get_num_threads(), x.item()


def _rank1_fails(rank, world, how):
    if rank == 0:
        return "fine"
    if how == "raise":
        raise ValueError("planted failure in the child")
    if how == "tensor":
        import torch

        return {"a": [1, torch.zeros(2)]}
    if how == "unpicklable":
        return lambda: 0  # (the queue's feeder thread fails to pickle it and the child exits 0)
    os._exit(3)  # dies without reporting


def test_results_in_rank_order_and_failures_name_the_rank():
    # 3 processes, offset 10: each sees the all-reduced 10 + 11 + 12
    assert in_processes(_sum_of_ranks, 10, world=3) == [(r, 3, 1, 33.0) for r in range(3)]
    with pytest.raises(RuntimeError, match=r"(?s)_rank1_fails failed in rank 1 of 2:\nTraceback.*"
                                           r"ValueError: planted failure in the child"):
        in_processes(_rank1_fails, "raise")
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2.*TypeError: _rank1_fails returned a torch.Tensor at "
                                           r"result\['a'\]\[1\].*\.tolist\(\)"):
        in_processes(_rank1_fails, "tensor")
    with pytest.raises(RuntimeError, match=r"_rank1_fails: rank 1 of 2 exited with code 3 without a result"):
        in_processes(_rank1_fails, "exit", timeout=60)
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 exited with code 0 without a result .*cannot be pickled"):
        in_processes(_rank1_fails, "unpicklable", timeout=60)
