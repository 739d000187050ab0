"""The loader's rank split under a real process group: two torchrun processes over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kdcache
from kdcache.loader import EpochPlan

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from kdcache.loader import CacheDataset, make_loader

    dist.init_process_group("gloo")
    cache, out, drop_last = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    ds = CacheDataset(cache, batch_size=100, seed=3, drop_last=drop_last)  # rank and world from the group
    ds.set_epoch(1)
    batches = [b["row"].tolist() for b in make_loader(ds, num_workers=1)]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"rank": ds.rank, "world": ds.world, "batches": batches})
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(everyone, f)
    dist.destroy_process_group()
    """
)


@pytest.mark.parametrize("drop_last", [False, True])
def test_two_torchrun_ranks_split_every_epoch_exactly(digits_cache, tmp_path, drop_last):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(digits_cache), str(out), str(int(drop_last))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    rows = kdcache.open(digits_cache).rows
    seen = [row for r in ranks for b in r["batches"] for row in b]
    assert len(seen) == len(set(seen))  # disjoint
    if drop_last:  # every rank steps the same number of times, whole batches only
        assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == rows // 2 // 100
        assert all(len(b) == 100 for r in ranks for b in r["batches"])
    else:
        assert sorted(seen) == list(range(rows))  # covering
    for r in ranks:  # exactly the pure plan of that rank
        plan = EpochPlan(rows, 100, seed=3, epoch=1, rank=r["rank"], world=2, drop_last=drop_last)
        expected = [np.sort(plan.batch(b)).tolist() for b in range(plan.num_batches)]
        assert r["batches"] == expected
