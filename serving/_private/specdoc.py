"""Render the spec reference (docs/spec.md) from the pydantic models themselves.

``python -m serving._private.specdoc > docs/spec.md``; a unit test keeps the
committed file equal to a fresh render, so the reference cannot drift.
"""

from __future__ import annotations

import inspect

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from serving import pools, spec

_MODELS: list[type[BaseModel]] = [
    spec.ModelDeployment,
    spec.ModelSource,
    spec.Resources,
    spec.AutoscalingSpec,
    spec.QueueSpec,
    spec.WarmupSpec,
    spec.HealthSpec,
    spec.MemorySpec,
    spec.BatchingSpec,
    spec.AuthSpec,
    pools.ServingSpec,
    pools.NodePool,
    pools.Taint,
]


def _type_name(annotation: object) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("serving.spec.", "").replace("|", "\\|")


def _default(field: object) -> str:
    if field.default_factory is not None:  # type: ignore[attr-defined]
        value = field.default_factory()  # type: ignore[attr-defined]
        return f"`{value!r}`" if not isinstance(value, BaseModel) else "(defaults)"
    if field.default is PydanticUndefined:  # type: ignore[attr-defined]
        return "**required**"
    return f"`{field.default!r}`"  # type: ignore[attr-defined]


def render() -> str:
    lines = [
        "# Model deployment spec reference",
        "",
        "Generated from `serving/spec.py` by `python -m serving._private.specdoc`; do not edit by hand.",
        "Every model rejects unknown fields. Constraints (ranges, cross-field rules) are checked when",
        "the spec is built, with errors naming the field, the value and the fix.",
        "",
    ]
    for model in _MODELS:
        lines += [f"## `{model.__name__}`", "", inspect.cleandoc(model.__doc__ or "").split("\n\n")[0], ""]
        lines += ["| field | type | default | description |", "| --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            desc = (field.description or "").replace("|", "\\|")
            if not desc and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                desc = f"See `{field.annotation.__name__}`."
            lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {desc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
