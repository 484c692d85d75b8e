"""Helpers for testing gpuserve deployments without a GPU or network.

``make_tiny_causal_lm`` writes a small, randomly initialised causal LM and its
tokenizer to a directory with ``save_pretrained``, so tests and examples load
it through the same ``from_pretrained`` path a real model takes. ``process_pids``,
``replica_pids`` and ``honouring_post`` are for fault tests: find a replica's
process to kill, and send like a client that honours Retry-After.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

if TYPE_CHECKING:
    from serving._private.autoscaling_cluster import AutoscalingCluster
    from serving.pools import NodePool

__all__ = [
    "autoscaling_cluster",
    "free_port",
    "honouring_post",
    "json_stdout",
    "local_cluster",
    "make_random_llama",
    "make_tiny_causal_lm",
    "process_pids",
    "replica_pids",
    "wait_for_replicas",
]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "GPU nodes take minutes to provision; scale before the spike arrives.",
    "A replica joins only once its model is loaded and warm.",
    "Bounded queues answer fast with 429 and Retry-After instead of hanging.",
    "Once upon a time there was a small model that generated text.",
    "0123456789 !?.,;:'\"()[]{}-_/\\ abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def json_stdout():
    """A writable file on the process's original stdout, with everything else sent to stderr.

    Ray forwards its processes' log lines to the driver's stdout; a benchmark that prints its result as
    JSON on stdout calls this first, writes the JSON to the file returned, and its stdout stays JSON.
    """
    import os

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return out


def process_pids(title: bytes) -> list[int]:
    """PIDs of this machine's processes titled exactly ``title`` (Ray titles an actor's worker
    ``ray::<actor class>``, e.g. ``ray::ServeController``)."""
    import os

    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    # Exactly the title: "<app>-gateway" replicas share the model's prefix.
                    if f.read().split(b"\0")[0].strip() == title:
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def replica_pids(app: str, deployment: Optional[str] = None) -> list[int]:
    """PIDs of a Serve deployment's replicas on this machine (default: the deployment named like the app)."""
    return process_pids(f"ray::ServeReplica:{app}:{deployment or app}".encode())


def wait_for_replicas(app: str, deployment: str, n: int, timeout_s: float = 120.0) -> list[int]:
    """Wait until ``n`` replicas of the deployment have live processes here and the app is RUNNING
    (after a fault, Serve's restart); returns their PIDs.

    Raises:
        TimeoutError: not whole again within ``timeout_s``.
    """
    import time

    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = replica_pids(app, deployment)
        status = serve.status().applications.get(app)
        if len(pids) == n and status is not None and status.status == "RUNNING":
            return pids
        time.sleep(0.5)
    raise TimeoutError(f"{app}/{deployment}: {replica_pids(app, deployment)} running after {timeout_s} s, wanted {n}")


def honouring_post(
    url: str, body: object, deadline_s: float = 60.0, codes: Optional[list] = None
) -> tuple[list[int], bool, float]:
    """POST until a final answer, waiting as each 429/503's Retry-After asks, for at most ``deadline_s``.

    Returns:
        The statuses seen in order (the last is the final answer, or a 429/503 when the deadline
        passed), whether every 429/503 carried Retry-After, and the seconds to the last answer. The
        error codes of the 503s are appended to ``codes``.
    """
    import time

    import httpx

    seen: list[int] = []
    told = True
    start = time.monotonic()
    with httpx.Client(timeout=deadline_s) as c:
        while True:
            r = c.post(url, json=body)
            seen.append(r.status_code)
            if r.status_code not in (429, 503):
                break
            if r.status_code == 503 and codes is not None:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    codes.append(r.json()["error"]["code"])
            after = r.headers.get("retry-after")
            told = told and after is not None
            if time.monotonic() - start > deadline_s:
                break
            time.sleep(float(after or 1.0))
    return seen, told, time.monotonic() - start


# A plain role-tagged template: enough to exercise rendering, the generation prompt, and a template
# that refuses a conversation (as many real ones do) when a system message is not the first.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('a system message may only come first') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _write_tokenizer(out: Path, n_positions: int, vocab_size: int, chat_template: Optional[str]) -> Any:
    """Train a byte-level BPE tokenizer on a small corpus and save it to ``out``; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=eos, model_max_length=n_positions
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out)
    return fast


def _write_random_model(
    directory: Union[str, Path],
    family: str,
    context_tokens: int,
    vocab_size: int,
    seed: int,
    chat_template: Optional[str],
    **config: Any,
) -> Path:
    """Save the tokenizer and a seeded random model of ``family`` (transformers' ``<family>Config`` and
    causal-LM class) built from ``config``."""
    import torch
    import transformers

    out = Path(directory)
    fast = _write_tokenizer(out, context_tokens, vocab_size, chat_template)
    torch.manual_seed(seed)
    model_cls = {"GPT2": transformers.GPT2LMHeadModel, "Llama": transformers.LlamaForCausalLM}[family]
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=len(fast), bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id, **config
    )
    model_cls(cfg).save_pretrained(out)
    return out


def make_tiny_causal_lm(
    directory: Union[str, Path],
    *,
    n_positions: int = 256,
    vocab_size: int = 400,
    seed: int = 0,
    chat_template: Optional[str] = TINY_CHAT_TEMPLATE,
) -> Path:
    """Write a tiny GPT-2-style model with a byte-level BPE tokenizer.

    Args:
        directory: Where to save (created if missing).
        n_positions: The model's context length, in tokens.
        vocab_size: Target tokenizer vocabulary size (byte-level: any text encodes).
        seed: Seed for the random weights, so outputs are reproducible.
        chat_template: The tokenizer's chat template (Jinja), or None for a model without one.

    Returns:
        The directory, ready for ``AutoModelForCausalLM.from_pretrained``.
    """
    return _write_random_model(
        directory, "GPT2", n_positions, vocab_size, seed, chat_template, n_positions=n_positions, n_embd=64, n_layer=2, n_head=2
    )


def make_random_llama(
    directory: Union[str, Path],
    *,
    hidden_size: int = 640,
    layers: int = 8,
    heads: int = 10,
    kv_heads: int = 5,
    intermediate_size: int = 1792,
    max_positions: int = 2048,
    vocab_size: int = 400,
    seed: int = 0,
    chat_template: Optional[str] = TINY_CHAT_TEMPLATE,
) -> Path:
    """Write a randomly initialised Llama-style model (RoPE, grouped-query attention, SwiGLU) for benchmarks.

    The defaults give about 38M parameters: large enough that a decode step is matrix work rather than
    per-step overhead, as on a real model, and small enough for a CPU. Same tokenizer as
    :func:`make_tiny_causal_lm`.

    Returns:
        The directory, ready for ``AutoModelForCausalLM.from_pretrained``.
    """
    return _write_random_model(
        directory,
        "Llama",
        max_positions,
        vocab_size,
        seed,
        chat_template,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
    )


@contextlib.contextmanager
def local_cluster(
    pools: list["NodePool"],
    nodes: Optional[dict[str, int]] = None,
    object_store_memory_bytes: int = 80 * 1024 * 1024,
) -> Iterator[object]:
    """A multi-node Ray cluster on this machine, shaped like the pools, with fake GPUs.

    The head node gets no CPUs and no GPUs, so nothing user-level can run there.
    Each pool gets ``nodes[pool.name]`` nodes (default: ``pool.max_nodes``),
    each with the pool's CPUs, whole fake GPUs, accelerator type and labels, so
    placement can be checked on a laptop exactly as on the real cluster.
    The driver is connected (``ray.init``) for the duration.

    Args:
        pools: The node pools to emulate.
        nodes: Node count per pool name, to start a pool below its max.
        object_store_memory_bytes: Per node; small, since many nodes share one machine.

    Yields:
        The ``ray.cluster_utils.Cluster``.
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "num_gpus": 0, "object_store_memory": object_store_memory_bytes},
    )
    try:
        for pool in pools:
            count = (nodes or {}).get(pool.name, pool.max_nodes)
            resources = {f"accelerator_type:{pool.accelerator_type}": 1.0} if pool.accelerator_type else {}
            for _ in range(count):
                cluster.add_node(
                    num_cpus=pool.cpus_per_node,
                    num_gpus=pool.gpus_per_node,
                    resources=resources,
                    labels=pool.ray_labels,
                    object_store_memory=object_store_memory_bytes,
                )
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@contextlib.contextmanager
def autoscaling_cluster(
    pools: list["NodePool"],
    provisioning_s: Union[float, dict[str, float], None] = None,
    idle_timeout_s: float = 10.0,
    head_cpus: float = 0.0,
    env: Optional[dict[str, str]] = None,
) -> Iterator["AutoscalingCluster"]:
    """A local Ray cluster whose GPU nodes are launched by Ray's own autoscaler (v2), slowly.

    Only the head runs at first (no CPUs by default, so no work lands there). Each pool becomes one
    of the autoscaler's node types: its CPUs, whole fake GPUs, accelerator resource and labels, at
    most ``max_nodes``. When Ray's autoscaler launches a node (for pending replicas, or for
    ``request_resources``, which the predictive policy sends ahead of the replicas), the node joins
    ``provisioning_s`` later, as a cloud GPU node would; an idle node is released after
    ``idle_timeout_s``. The driver is connected (``ray.init``) for the duration. On exit, even after
    a failure, every process of this cluster is ended (nothing else on the machine is: no
    ``ray stop``).

    Args:
        pools: The node pools.
        provisioning_s: Delay from launch to join: one for every pool, per pool name, or None for
            each pool's own ``provisioning_s``.
        idle_timeout_s: How long a node stays idle before Ray's autoscaler releases it.
        head_cpus: CPUs of the head node.
        env: Environment for the cluster's processes (head, autoscaler, nodes, replicas), on top of
            this process's.

    Yields:
        The running cluster: its ``address``, ``events()`` (launch, joined, terminated, with times)
        and ``gpu_node_seconds()``.
    """
    import ray

    from serving._private.autoscaling_cluster import AutoscalingCluster

    cluster = AutoscalingCluster(pools, provisioning_s, idle_timeout_s, head_cpus, env)
    try:
        cluster.start()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()
