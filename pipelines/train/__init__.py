"""The training stage: Ray Train DDP over the data stage's stream, checkpoints in the run's storage.

- ``config``: ``TrainConfig`` (YAML recipes, KEY=VALUE overrides, versions and migration, resume checks)
- ``optim``: AdamW parameter groups and the learning-rate schedule
- ``state``: the model and optimizer a worker trains, built and restored on its device
- ``loop``: ``train_loop_per_worker``, what every worker runs
- ``evaluate``: the exact distributed evaluation
- ``launch``: ``fit``, the driver's side (paths, resume, CPU plan, the TorchTrainer)
- ``metrics``, ``tracking``: the per-epoch records, curves and experiment trackers
"""
