"""Offline batch labeling: inputs (pipelines/label/inputs.py) through a registered model into Parquet with
Ray Data (pipelines/label/job.py)."""
