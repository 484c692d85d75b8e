"""Helpers for testing gpuserve deployments without a GPU or network.

``make_tiny_causal_lm`` writes a small, randomly initialised causal LM and its
tokenizer to a directory with ``save_pretrained``, so tests and examples load
it through the same ``from_pretrained`` path a real model takes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Union

if TYPE_CHECKING:
    from serving.pools import NodePool

__all__ = ["local_cluster", "make_tiny_causal_lm"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "GPU nodes take minutes to provision; scale before the spike arrives.",
    "A replica joins only once its model is loaded and warm.",
    "Bounded queues answer fast with 429 and Retry-After instead of hanging.",
    "Once upon a time there was a small model that generated text.",
    "0123456789 !?.,;:'\"()[]{}-_/\\ abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def make_tiny_causal_lm(
    directory: Union[str, Path],
    *,
    n_positions: int = 256,
    vocab_size: int = 400,
    seed: int = 0,
) -> Path:
    """Write a tiny GPT-2-style model with a byte-level BPE tokenizer.

    Args:
        directory: Where to save (created if missing).
        n_positions: The model's context length, in tokens.
        vocab_size: Target tokenizer vocabulary size (byte-level: any text encodes).
        seed: Seed for the random weights, so outputs are reproducible.

    Returns:
        The directory, ready for ``AutoModelForCausalLM.from_pretrained``.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = Path(directory)
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
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(fast),
        n_positions=n_positions,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


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
