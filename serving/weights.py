"""A verified, node-local weight cache.

A GPU node that joins during a spike must not spend its first minutes pulling
weights from a slow shared volume, nor load a half-copied file. ``prefetch``
copies a model into ``CACHE_DIR/<key>/`` with a manifest of every file's size
and SHA-256, writing to a temporary directory and renaming it into place, so a
cache entry is either complete or absent. ``ensure_cached`` verifies an entry
before a replica loads it and refills a corrupt one from the source.

Sources are local directories (an image path, a mounted volume) and
``package://NAME``; gpuserve never downloads weights at run time.

A manifest inside the cache only proves the entry is whole: whoever can write the
cache can rewrite weights and manifest together. So ``prefetch`` also records the
manifest's digest, computed from the *source*, in a digest directory outside the
cache (``digest_dir``; on Kubernetes a volume the replica's container mounts
read-only), and ``ensure_cached`` refuses an entry whose manifest does not hash to
the recorded digest. An existing entry is re-checked against the source before it
is reused, so a tampered shared cache is refilled, never trusted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Union

__all__ = [
    "CacheCorrupt",
    "cache_key",
    "ensure_cached",
    "manifest_digest",
    "prefetch",
    "resolve_model_path",
    "verify_entry",
]

MANIFEST = "gpuserve-manifest.json"
_CHUNK = 1 << 20


def resolve_model_path(path: str) -> Path:
    """Turn ``model.path`` into a local directory holding ``config.json``.

    ``package://NAME`` finds an installed package's bundled model without
    importing it (importing could have side effects): ``NAME/model`` if that
    holds a model, else the package directory itself.

    Raises:
        FileNotFoundError: with the path tried and how to fix it.
    """
    if path.startswith("package://"):
        name = path[len("package://") :]
        found = importlib.util.find_spec(name)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"model.path {path!r}: package {name!r} is not installed; pip install it "
                "or point model.path at a model directory"
            )
        root = Path(next(iter(found.submodule_search_locations)))
        candidates = [root / "model", root]
    else:
        candidates = [Path(path).expanduser()]
    for c in candidates:
        if (c / "config.json").is_file():
            return c.resolve()
    raise FileNotFoundError(
        f"model.path {path!r}: no config.json in {', '.join(str(c) for c in candidates)}; "
        "point model.path at a directory saved with save_pretrained()"
    )


class CacheCorrupt(RuntimeError):
    """A cache entry does not match its manifest."""


def cache_key(source: str) -> str:
    """A stable directory name for a source: readable prefix + hash of the full source."""
    resolved = str(resolve_model_path(source))
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", source.replace("package://", "package-")).strip("-")[-60:]
    return f"{readable}-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(files: dict[str, dict[str, Any]]) -> str:
    """SHA-256 of a manifest's file table (path -> size and SHA-256), in a canonical form."""
    table = {rel: {"size": int(m["size"]), "sha256": str(m["sha256"])} for rel, m in files.items()}
    return hashlib.sha256(json.dumps(table, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _digest_file(digest_dir: Union[str, Path], entry: Path) -> Path:
    return Path(digest_dir).expanduser() / f"{entry.name}.sha256"


def _model_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.name != MANIFEST)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_bytes(root: Union[str, Path]) -> int:
    """Bytes of weight files under a model directory (what loading it reads)."""
    return sum(p.stat().st_size for p in _model_files(Path(root)) if p.suffix in _WEIGHT_SUFFIXES)


def verify_entry(entry: Union[str, Path], verify: Literal["sha256", "size"] = "sha256") -> dict[str, Any]:
    """Check a cache entry against its manifest; return the manifest.

    Raises:
        CacheCorrupt: naming the first file that is missing, resized or altered.
    """
    entry = Path(entry)
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CacheCorrupt(f"{entry}: manifest {MANIFEST} is missing or unreadable ({e})") from None
    for rel, meta in files.items():
        p = entry / rel
        if not p.is_file():
            raise CacheCorrupt(f"{entry}: {rel} is missing")
        size = p.stat().st_size
        if size != meta["size"]:
            raise CacheCorrupt(f"{entry}: {rel} is {size} bytes, manifest says {meta['size']}")
        if verify == "sha256" and _sha256(p) != meta["sha256"]:
            raise CacheCorrupt(f"{entry}: {rel} does not match its SHA-256 in the manifest")
    return manifest


def _copy_hashed(src: Path, dst: Path) -> dict[str, Any]:
    """Copy one file, hashing what was read from the source (one read, not a copy then a re-read)."""
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _source_files(src: Path) -> dict[str, dict[str, Any]]:
    return {f.relative_to(src).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)} for f in _model_files(src)}


def _record_digest(digest_dir: Union[str, Path, None], entry: Path, digest: str) -> None:
    if digest_dir is None:
        return
    target = _digest_file(digest_dir, entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(digest + "\n")
    os.replace(tmp, target)


def prefetch(source: str, cache_dir: Union[str, Path], digest_dir: Union[str, Path, None] = None) -> Path:
    """Copy ``source`` into the cache (unless an entry equal to the source is there); return the entry path.

    Args:
        source: A model directory or ``package://NAME``.
        cache_dir: The cache directory.
        digest_dir: Where to record the manifest's digest, outside the cache (see the module docstring).

    Raises:
        FileNotFoundError: the source is not a model directory.
    """
    src = resolve_model_path(source)
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    entry = cache / cache_key(source)
    if entry.is_dir():
        try:
            manifest = verify_entry(entry, "sha256")
            # Whole is not enough: the entry must be the source's files (a writer of the cache could have
            # replaced weights and manifest together).
            digest = manifest_digest(manifest["files"])
            if digest != manifest_digest(_source_files(src)):
                raise CacheCorrupt(f"{entry}: differs from its source {src}")
            _record_digest(digest_dir, entry, digest)
            return entry
        except CacheCorrupt:
            _move_aside(entry)
    tmp = cache / f".{entry.name}.tmp-{os.getpid()}-{time.time_ns()}"
    files: dict[str, dict[str, Any]] = {}
    try:
        for f in _model_files(src):
            rel = f.relative_to(src).as_posix()
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            files[rel] = _copy_hashed(f, dst)
        if "config.json" not in files:
            raise FileNotFoundError(f"{src}: no config.json; not a model directory")
        manifest = {"source": source, "resolved_source": str(src), "created_s": time.time(), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        try:
            os.replace(tmp, entry)
        except OSError:
            # Another process (another replica on this node) finished first: keep its entry.
            files = verify_entry(entry, "size")["files"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _record_digest(digest_dir, entry, manifest_digest(files))
    return entry


def _move_aside(entry: Path) -> None:
    aside = entry.with_name(f".{entry.name}.corrupt-{time.time_ns()}")
    os.replace(entry, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _check_recorded(entry: Path, manifest: dict[str, Any], digest_dir: Union[str, Path]) -> None:
    recorded = _digest_file(digest_dir, entry)
    try:
        want = recorded.read_text().strip()
    except OSError:
        raise CacheCorrupt(
            f"{entry}: no digest recorded for it in {digest_dir} (outside the cache); "
            f"`gpuserve prefetch SOURCE --cache-dir CACHE --digest-dir {digest_dir}` records it"
        ) from None
    if manifest_digest(manifest["files"]) != want:
        raise CacheCorrupt(f"{entry}: its manifest does not match the digest recorded in {recorded}")


def ensure_cached(
    source: str,
    cache_dir: Union[str, Path],
    verify: Literal["sha256", "size"] = "sha256",
    digest_dir: Union[str, Path, None] = None,
) -> Path:
    """The verified cache entry for ``source``, filling or refilling it from the source if needed.

    Args:
        source: A model directory or ``package://NAME``.
        cache_dir: The cache directory.
        verify: Check the files' SHA-256 against the manifest, or only their sizes.
        digest_dir: Where ``prefetch`` recorded the manifest's digest; when given, an entry whose
            manifest does not match it is refused (refilled where the cache is writable).

    Raises:
        FileNotFoundError: the entry is absent or corrupt and the source cannot be read.
        CacheCorrupt: the entry is corrupt and cannot be refilled here (a read-only cache).
    """
    entry = Path(cache_dir).expanduser() / _entry_name(source, cache_dir)
    if entry.is_dir():
        try:
            manifest = verify_entry(entry, verify)
            if digest_dir is not None:
                _check_recorded(entry, manifest, digest_dir)
            return entry
        except CacheCorrupt as e:
            try:
                _move_aside(entry)
            except OSError:
                # The replica's container mounts the cache read-only: never load it, say why.
                raise CacheCorrupt(f"{e}; the cache is read-only here, so the model is not loaded") from None
    return prefetch(source, cache_dir, digest_dir)


def _entry_name(source: str, cache_dir: Union[str, Path]) -> str:
    try:
        return cache_key(source)
    except FileNotFoundError:
        # The source is unreachable here (e.g. the volume is only mounted in the init
        # container): find the entry prefetch made by the source recorded in its manifest.
        for manifest in Path(cache_dir).expanduser().glob(f"*/{MANIFEST}"):
            try:
                if json.loads(manifest.read_text()).get("source") == source:
                    return manifest.parent.name
            except (OSError, ValueError):
                continue
        raise FileNotFoundError(
            f"model {source!r} is neither readable nor in the cache {cache_dir}; run "
            f"`gpuserve prefetch {source} --cache-dir {cache_dir}` where the source is reachable"
        ) from None
