"""Optional experiment trackers, fed by rank 0 once per epoch: TensorBoard and MLflow.

Ray Train V2 runs no logger callbacks of its own: experiment trackers are called from the training function
(on rank 0, so that nothing is logged twice). Each tracker is off unless the config asks for it, and needs
its package only then (``pip install tensorboard`` / ``pip install mlflow``).

- TensorBoard: event files are written locally and copied after every epoch to ``<run>/tensorboard/``
  beside the checkpoints, whatever the storage (S3 or a local path): ``tensorboard --logdir`` on a local
  copy of that folder shows the run, restarts included (each attempt writes its own event file).
- MLflow: through Ray's ``setup_mlflow`` integration; the run's config is logged as parameters and every
  epoch's metrics with the epoch as the step.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipelines import storage
from pipelines.train.metrics import COLUMNS

SCALARS = [c for c in COLUMNS if c not in ("epoch", "step", "resumed")]  # the epoch is the step


class Trackers:
    def __init__(self, run_uri: str, name: str, config: dict, tensorboard: bool, mlflow_tracking_uri: str):
        self._run_uri = run_uri
        self._tb_dir = None
        self._tb = None
        self._mlflow = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._tb_dir = tempfile.TemporaryDirectory(prefix="crossvit-tb-")
            self._tb = SummaryWriter(self._tb_dir.name)
        if mlflow_tracking_uri:
            from ray.air.integrations.mlflow import setup_mlflow  # optional: needs the mlflow package

            self._mlflow = setup_mlflow(
                config=_flat(config),
                tracking_uri=mlflow_tracking_uri,
                experiment_name=name,
                create_experiment_if_not_exists=True,
                run_name=name,
                tags={"crossvit.run": run_uri},
            )

    def log(self, metrics: dict) -> None:
        epoch = metrics["epoch"]
        scalars = {k: float(metrics[k]) for k in SCALARS if metrics.get(k) is not None}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, epoch)
            self._tb.flush()
            for f in Path(self._tb_dir.name).iterdir():
                storage.upload_file(f, storage.join(self._run_uri, "tensorboard", f.name))
        if self._mlflow is not None:
            self._mlflow.log_metrics(scalars, step=epoch)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb_dir.cleanup()
        if self._mlflow is not None:
            self._mlflow.end_run()


def _flat(config: dict, prefix: str = "") -> dict:
    """MLflow parameters are flat strings: {"cfg": {"lr": 1}} -> {"cfg.lr": "1"}; long lists are left out."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif len(str(value)) <= 500:  # MLflow's limit on a parameter's value (the class list is longer)
            out[f"{prefix}{key}"] = str(value)
    return out
