"""Scale from zero on real Ray Serve: the first request through the admission gateway wakes a deployment
that has no replica, and is answered (the render keeps a Serve proxy to receive it on Kubernetes)."""

import time

import pytest

from serving import AutoscalingSpec, ModelDeployment, ModelSource, WarmupSpec
from tests.conftest import MINILM


def running(app: str, deployment: str) -> int:
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None or deployment not in st.deployments:
        return 0
    return st.deployments[deployment].replica_states.get("RUNNING", 0)


@pytest.mark.parametrize("policy", ["predictive", None])
def test_the_first_request_wakes_a_deployment_at_zero_replicas_and_is_answered(deploy, policy):
    from ray import serve

    app = f"zero-{policy or 'ray'}"
    spec = ModelDeployment(
        name="sleepy",
        task="embeddings",
        model=ModelSource(path=MINILM),
        warmup=WarmupSpec(cover_max_input=False, min_rounds=1, max_rounds=1),
        autoscaling=AutoscalingSpec(min_replicas=0, max_replicas=1, downscale_delay_s=600, policy=policy),
    )
    try:
        client = deploy(spec.build(), app, f"/{app}")
        assert running(app, "sleepy") == 0
        t0 = time.monotonic()
        r = client.post("/v1/embeddings", json={"input": "wake up"}, timeout=180)
        assert r.status_code == 200, r.text
        assert len(r.json()["data"][0]["embedding"]) == 384
        # serve.status() is the controller's last snapshot: it may show the replica a moment after it answered.
        deadline = time.monotonic() + 30
        while running(app, "sleepy") != 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert running(app, "sleepy") == 1
        # Readiness from the gateway's state follows the replica count.
        assert client.get("/health").status_code == 200
        print(f"woke from zero in {time.monotonic() - t0:.1f} s")
    finally:
        serve.delete(app)
