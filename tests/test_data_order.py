"""The trainer's data order: a permutation per epoch, sharded across processes, block-aware."""

import torch

from sipo.data.order import DataOrder


def test_each_epoch_is_a_permutation_and_epochs_differ():
    order = DataOrder(10, seed=3)
    first = [i for k in range(5) for i in order.batch(k, 2)]  # micro-batches 0-4 = epoch 0
    second = [i for k in range(5, 10) for i in order.batch(k, 2)]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second


def test_processes_read_disjoint_shares_of_each_global_batch():
    order = DataOrder(12, seed=0)
    shares = [order.batch(0, 3, rank, world=2) for rank in range(2)] + [order.batch(1, 3, rank, world=2) for rank in range(2)]
    flat = [i for share in shares for i in share]
    assert sorted(flat) == list(range(12))  # two global batches of 2x3 cover the epoch once


def test_same_seed_same_order_and_batches_straddle_epochs():
    a, b = DataOrder(5, seed=7), DataOrder(5, seed=7)
    assert [a.batch(k, 2) for k in range(6)] == [b.batch(k, 2) for k in range(6)]
    straddle = a.batch(2, 2)  # positions 4 and 5: last of epoch 0, first of epoch 1
    assert straddle == [int(a.epoch_order(0)[4]), int(a.epoch_order(1)[0])]


def test_block_shuffle_keeps_blocks_contiguous():
    block_ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    order = DataOrder(10, seed=1, block_ids=block_ids).epoch_order(0)
    blocks_in_order = block_ids[order].tolist()
    runs = [blocks_in_order[0]] + [b for prev, b in zip(blocks_in_order, blocks_in_order[1:]) if b != prev]
    assert sorted(runs) == [0, 1, 2]  # each block read as one run
    assert sorted(order.tolist()) == list(range(10))
