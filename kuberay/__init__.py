"""gpuserve on Kubernetes: render a RayService with separate GPU worker groups, and validate it offline.

Public API: :class:`RenderOptions`, :func:`render`, :func:`to_yaml`, :func:`validate_documents`,
:func:`validate_file`, :class:`Finding`, :func:`upgrade_fits` (what an upgrade needs of the GPU pools).
The CLI: ``gpuserve render`` and ``gpuserve validate``.
"""

from kuberay.render import RenderOptions, render, to_yaml
from kuberay.validate import Finding, UpgradeFit, upgrade_fits, validate_documents, validate_file

__all__ = ["Finding", "RenderOptions", "UpgradeFit", "render", "to_yaml", "upgrade_fits", "validate_documents", "validate_file"]
