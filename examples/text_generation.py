"""Text generation (OpenAI /v1/completions and /v1/chat/completions) with a causal LM from a local directory.

gpuserve never downloads weights at run time: fetch them first (for example
``huggingface-cli download Qwen/Qwen2.5-0.5B --local-dir /models/qwen``, or a
volume your platform mounts), then point this example at the directory::

    GPUSERVE_MODEL_PATH=/models/qwen serve run examples.text_generation:app

On a GPU node the replica asks Ray for one whole GPU (``GPUSERVE_GPUS``,
default 1) and loads the model in float16 there ('auto' dtype). Set
``GPUSERVE_GPUS=0`` to try it on a laptop's CPU.

    curl -N http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"model": "my-llm", "prompt": "Once upon a time", "max_tokens": 32, "stream": true}'

Chat renders ``messages`` with the tokenizer's chat template (a model without one answers 400)::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="my-llm", messages=[{"role": "user", "content": "Hi"}], max_tokens=32)
"""

import os

from serving import AutoscalingSpec, BatchingSpec, ModelDeployment, ModelSource, QueueSpec, Resources, WarmupSpec

model_path = os.environ.get("GPUSERVE_MODEL_PATH")
if not model_path:
    raise SystemExit(
        "GPUSERVE_MODEL_PATH is not set: point it at a directory saved with save_pretrained() "
        "(config.json, tokenizer and weights), e.g. GPUSERVE_MODEL_PATH=/models/qwen"
    )
gpus = int(os.environ.get("GPUSERVE_GPUS", "1"))

spec = ModelDeployment(
    name="llm",
    task="text_generation",
    model=ModelSource(path=model_path, served_name=os.environ.get("GPUSERVE_SERVED_NAME", "my-llm")),
    # Whole GPUs: the replica waits for a free GPU rather than sharing one.
    resources=Resources(gpus=gpus, cpus=2 if gpus else 1),
    autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=int(os.environ.get("GPUSERVE_MAX_REPLICAS", "2"))),
    queue=QueueSpec(max_ongoing_requests=16, max_queued_requests=64),
    batching=BatchingSpec(max_batch_size=8, batch_wait_timeout_s=0.01),
    warmup=WarmupSpec(inputs=["Hello", "Once upon a time in a land far away"], min_rounds=1, max_rounds=3),
)

app = spec.build()
