"""A real local Ray Serve for the whole integration session, reached over real HTTP."""

import glob
import os
from typing import Optional, Union

import httpx
import pytest

from serving.testing import free_port  # noqa: F401 - the integration tests import it from here


def controller_log_lines(marker: Union[str, tuple[str, ...]], logs_dir: Optional[str] = None) -> list[str]:
    """Lines holding ``marker`` (or any of several) in the Serve controller's logs (default: the connected session's)."""
    if logs_dir is None:
        import ray

        logs_dir = ray._private.worker.global_worker.node.get_logs_dir_path()
    out = []
    for path in glob.glob(os.path.join(logs_dir, "serve", "controller_*.log")):
        with open(path) as f:
            markers = (marker,) if isinstance(marker, str) else marker
            out += [line for line in f if any(m in line for m in markers)]
    return out


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """The port Ray's metrics agent exports Prometheus text on."""
    return free_port()


@pytest.fixture(scope="session")
def serve_instance(metrics_port):
    """Start Ray (no dashboard) and Serve on a free port; yield the HTTP base URL."""
    import os

    import ray
    from ray import serve

    # Replicas push their load metrics to the controller every second (Ray's default is 10 s), so the
    # autoscaling tests can run on short timescales; the processes Ray starts inherit this.
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    # As `gpuserve run` and the rendered pods do: the proxies load gpuserve's middleware.
    from serving.protocol import PROXY_ENV

    os.environ.update(PROXY_ENV)
    # 16 logical CPUs on a 2-core machine: they are scheduling tokens, not cores.
    # Replicas mostly wait, and the session holds several small deployments at
    # once while the autoscaling test still needs room for one more replica.
    # address="local": always a fresh cluster of our own, never one left running on the machine.
    ray.init(
        address="local", num_cpus=16, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def deploy(serve_instance):
    """deploy(app, name, route_prefix) -> httpx.Client rooted at that prefix."""
    from ray import serve

    clients = []

    def _deploy(app, name: str, route_prefix: str) -> httpx.Client:
        # serve.run returns once the app is RUNNING and raises if it fails to deploy.
        serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
        client = httpx.Client(base_url=serve_instance + route_prefix, timeout=60)
        clients.append(client)
        return client

    yield _deploy
    for c in clients:
        c.close()


@pytest.fixture(scope="session")
def embeddings_client(deploy):
    from examples.quickstart import app

    return deploy(app, "quickstart", "/emb")


@pytest.fixture(scope="session")
def generation_client(deploy, tiny_lm_dir):
    from serving import BatchingSpec, ModelDeployment, ModelSource, QueueSpec

    spec = ModelDeployment(
        name="tiny-llm",
        task="text_generation",
        model=ModelSource(path=str(tiny_lm_dir), served_name="tiny"),
        replicas=1,
        queue=QueueSpec(max_ongoing_requests=8, max_request_body_bytes=4096),
        batching=BatchingSpec(max_batch_size=4),
    )
    return deploy(spec.build(), "tiny-llm", "/gen")
