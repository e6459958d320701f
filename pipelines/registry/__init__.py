"""The registry stage: training checkpoints become numbered model versions, and aliases name the served one.

- ``store``: the registry on any storage URI (versions, aliases, compare-and-swap, checked loading)
- ``promote``: a run's best checkpoint -> a version, and the alias moved if it passes the gate
  (``python -m jobs.promote``)
"""
