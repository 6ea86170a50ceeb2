"""wsss.dist helpers and the metric accumulators under a real two-process gloo group (CPU, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from wsss import dist
from wsss.metrics import ConfusionMatrix, ThresholdSweep

L = 5
THRESHOLDS = [0.1, 0.3, 0.5, 0.7]


def make_images(n: int = 7) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        keys = np.sort(rng.choice(L - 1, size=2, replace=False))
        maps = rng.random((2, 4, 5)).astype(np.float32)
        gt = rng.integers(0, L, (4, 5)).astype(np.uint8)
        gt[0, 0] = 255
        out.append((maps, keys, gt))
    return out


def evaluate(ids: list[int]) -> dict[str, np.ndarray]:
    """Accumulate the given images and compute (collectively, when a group exists)."""
    images = make_images()
    cm = ConfusionMatrix(L)
    sweep = ThresholdSweep(L, THRESHOLDS, pxap_bins=10)
    for i in ids:
        maps, keys, gt = images[i]
        cm.update(gt, (maps.argmax(0) + 1).astype(np.uint8))
        sweep.update(maps, keys, gt)
    return {
        "cm": cm.compute().numpy(),
        "sweep": sweep.compute().numpy(),
        "pxap": np.array(sweep.compute_pxap()["pxap_per_class"]),
    }


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        assert dist.is_dist()
        assert dist.rank() == rank
        assert dist.world_size() == world
        assert dist.is_main() == (rank == 0)
        ids = dist.shard(list(range(len(make_images()))))
        result = evaluate(ids)
        result["ids"] = np.array(ids)
        result["sum"] = dist.all_reduce_sum(torch.tensor([rank + 1])).numpy()
        np.savez(Path(out_dir) / f"rank{rank}.npz", **result)
    finally:
        torch_dist.destroy_process_group()


def test_helpers_without_a_process_group():
    assert not dist.is_dist()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    assert dist.shard(["a", "b", "c"]) == ["a", "b", "c"]
    t = torch.tensor([1, 2])
    assert dist.all_reduce_sum(t) is t
    assert t.tolist() == [1, 2]


def test_two_ranks_reduce_to_the_single_process_result(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    single = evaluate(list(range(len(make_images()))))
    shards = []
    for rank in range(world):
        with np.load(tmp_path / f"rank{rank}.npz") as got:
            shards.append(got["ids"].tolist())
            assert got["sum"].tolist() == [3]
            for key in ("cm", "sweep"):
                np.testing.assert_array_equal(got[key], single[key])
            np.testing.assert_allclose(got["pxap"], single["pxap"], rtol=0, atol=1e-12)
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]  # strided by rank, ordered, a partition
