"""Ray's fake multi-node provider, with what real nodes have apart from each other given to each node it starts.

The autoscaler of tests/helpers.py's ``autoscaling_cluster`` loads this (``provider.type: external``) in the
head's monitor process, which is why it imports nothing of the tests. The fake provider starts each node as a
raylet on this machine, in the head's session folder and with the monitor's environment. Two things real
nodes have apart then collide (Ray 2.60):

- Serve's per-node listeners, whose ports a node's proxy reads from its environment: HAProxy's metrics and
  stats (9101 and 8404 unless set) and a worker node's HTTP proxy (the head's port). HAProxy runs with
  SO_REUSEPORT off, so a worker node's HAProxy could not bind them ("Address already in use"), and Serve
  restarted its proxy every few seconds, unhealthy.
- The runtime-env folder (``<session>/runtime_resources``): a node's runtime-env agent unpacks a job's
  working_dir there with ``overwrite=True`` (ray/_private/runtime_env/working_dir.py), removing the folder
  first (packaging.py, ``download_and_unpack_package``). The second node to run a task of a `ray job submit
  --working-dir` job removed the folder that the other nodes' processes were running in: Serve's proxies, whose
  HAProxy then failed to start or reload ("Impossible to retrieve startup directory name"). A proxy that cannot
  read its HAProxy's figures never finishes draining, so the node it is on never became idle and stayed.
"""

from __future__ import annotations

import functools
import os

import ray._private.parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

from pipelines.cluster import HAPROXY_PORTS
from pipelines.local_s3 import free_port

PER_NODE_PORTS = (*HAPROXY_PORTS, "RAY_SERVE_WORKER_PROXY_HTTP_PORT")


class FakeNodesApart(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        with self.lock:  # the node's processes start within this call, with the environment as it is now
            os.environ.update({name: str(free_port()) for name in PER_NODE_PORTS})
            ray_params = ray._private.parameter.RayParams  # what the fake provider builds the node's settings with
            folder = f"runtime_resources_{self._next_node_id + 1}"  # the number of the node it starts next
            ray._private.parameter.RayParams = functools.partial(ray_params, runtime_env_dir_name=folder)
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                ray._private.parameter.RayParams = ray_params
