"""The online serving stage: a Ray Serve application that serves the version a registry alias names.

- ``app``: the deployment and its routes (/v1, the Open Inference Protocol's /v2, administration)
- ``settings``: its arguments (infra/serve.yaml's ``args``)
- ``model``: the served versions (production, and a canary beside it), and the thread that follows the
  registry (hot reload)
- ``rollout``: the canary's split or shadow, and the judge that promotes or rolls it back
  (``python -m jobs.rollout`` and ``canary.auto``)
- ``evidence``: live figures per version from every replica, summed by the application's Rollout deployment
- ``images``: a request's images -> the model's input, with the checks hostile files need (CPU or GPU)
- ``oip``: the Open Inference Protocol's request and response codec (binary extension included)
- ``auth``: the classification and admin bearer tokens
- ``batching``: dynamic batching (why not ``@serve.batch``)
- ``errors``: the 4xx a client must fix
- ``deploy``: deploying it from its config file with the CPUs planned first (``python -m jobs.serve``)
"""
