"""Built-in tasks by name; user tasks by import path.

Kept free of heavy imports: the spec validates task names against this table
without importing torch, transformers or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> import path of the task class. A task class turns a ModelDeployment
# spec into a loaded model that answers parsed requests (the contract: serving.task.Task).
TASKS: dict[str, str] = {
    "embeddings": "deployments.embeddings:EmbeddingsTask",
    "text_generation": "deployments.text_generation:TextGenerationTask",
}


def import_object(path: str) -> Any:
    """Import ``module:attr`` (attr may be dotted) and return the object.

    Raises:
        ValueError: naming the path and what failed, never a bare ImportError.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"import path {path!r} must look like 'package.module:name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"import path {path!r}: cannot import module {module_name!r} ({e})") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ValueError(f"import path {path!r}: module {module_name!r} has no attribute {attr!r}") from e
    return obj


def resolve_task(name_or_path: str) -> type:
    """Return the task class for a built-in name or an import path."""
    if name_or_path in TASKS:
        return import_object(TASKS[name_or_path])
    if ":" in name_or_path:
        return import_object(name_or_path)
    raise ValueError(
        f"task {name_or_path!r} is unknown; built-in tasks: {', '.join(sorted(TASKS))}, "
        "or give an import path 'module:Class'"
    )
