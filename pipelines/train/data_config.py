"""How the data sets are split among the training workers: Ray Train's DataConfig, except for "val".

Ray Train's DataConfig splits every dataset with ``equal=True``, which may drop rows to even the shards out:
fine for training (every worker must take the same number of steps), wrong for evaluation. So "val" is
split with ``equal=False``, each worker counts its part, and one all-reduce sums the counts
(pipelines/train/evaluate.py). A module of its own, without torch: Ray Train's DatasetManager unpickles it.
"""

from __future__ import annotations

import ray.train


class ExactValDataConfig(ray.train.DataConfig):
    """Ray Train's DataConfig, except that "val" is split with ``equal=False``."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        rest = {k: v for k, v in datasets.items() if k != "val"}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            for i, split in enumerate(datasets["val"].streaming_split(world_size, equal=False)):
                output[i]["val"] = split
        return output
