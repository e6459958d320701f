"""The online serving stage: a Ray Serve application that serves the version a registry alias names.

- ``app``: the deployment (FastAPI ingress, dynamic batching, hot reload, input limits, auth, metrics)
- ``deploy``: deploying it from its config file (infra/serve.yaml) with the CPUs planned first
  (``python -m jobs.serve``)
"""
