"""The verified weight cache and `gpuserve prefetch`, on the real MiniLM files."""

import json

import pytest

from serving.cli import main
from serving.weights import CacheCorrupt, cache_key, ensure_cached, prefetch, verify_entry
from tests.conftest import MINILM


def test_prefetch_writes_a_complete_verified_entry(tmp_path):
    entry = prefetch(MINILM, tmp_path)
    manifest = verify_entry(entry)
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    assert manifest["source"] == MINILM
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary leftovers"
    assert prefetch(MINILM, tmp_path) == entry  # idempotent


def test_corruption_is_detected_and_repaired(tmp_path):
    entry = prefetch(MINILM, tmp_path)
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0xFF  # same size, one flipped byte: only the hash catches it
    weights.write_bytes(bytes(data))
    verify_entry(entry, "size")
    with pytest.raises(CacheCorrupt, match="model.safetensors does not match its SHA-256"):
        verify_entry(entry, "sha256")
    repaired = ensure_cached(MINILM, tmp_path, "sha256")
    verify_entry(repaired, "sha256")


def test_truncated_file_fails_even_the_size_check(tmp_path):
    entry = prefetch(MINILM, tmp_path)
    (entry / "vocab.txt").write_text("short")
    with pytest.raises(CacheCorrupt, match="vocab.txt is 5 bytes"):
        verify_entry(entry, "size")


def test_cached_entry_is_used_when_the_source_is_gone(tmp_path):
    src = tmp_path / "volume" / "model"
    entry = prefetch(MINILM, tmp_path / "seed")
    src.parent.mkdir()
    import shutil

    shutil.copytree(entry, src)
    cache = tmp_path / "cache"
    prefetch(str(src), cache)
    shutil.rmtree(src)  # e.g. the volume is mounted only in the init container
    assert (ensure_cached(str(src), cache) / "config.json").is_file()


def test_unreachable_source_and_empty_cache_explains_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="gpuserve prefetch /nowhere/model --cache-dir"):
        ensure_cached("/nowhere/model", tmp_path)


def test_task_loads_from_the_cache(tmp_path):
    from deployments.embeddings import EmbeddingsTask
    from serving import ModelDeployment, ModelSource

    spec = ModelDeployment(
        name="m", task="embeddings", model=ModelSource(path=MINILM, cache_dir=str(tmp_path), verify="size")
    )
    task = EmbeddingsTask(spec)
    assert task.model_dir == tmp_path / cache_key(MINILM)


def test_cli_prefetch(tmp_path, capsys):
    assert main(["prefetch", MINILM, "--cache-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["files"] >= 10 and out["bytes"] > 80_000_000
    assert main(["prefetch", "/does/not/exist", "--cache-dir", str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().err


def _rewrite_weights_and_manifest(entry):
    """What a compromised pod with write access to the cache could do: change a weight file and
    rewrite the manifest so the entry is self-consistent."""
    from serving.weights import MANIFEST, _sha256

    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0xFF
    weights.write_bytes(bytes(data))
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["files"]["model.safetensors"]["sha256"] = _sha256(weights)
    (entry / MANIFEST).write_text(json.dumps(manifest))
    verify_entry(entry, "sha256")  # the manifest inside the cache no longer catches it


def test_a_self_consistent_rewrite_is_caught_by_the_digest_kept_outside_the_cache(tmp_path):
    cache, digests = tmp_path / "cache", tmp_path / "digests"
    entry = prefetch(MINILM, cache, digests)
    recorded = (digests / f"{entry.name}.sha256").read_text().strip()
    assert ensure_cached(MINILM, cache, "sha256", digests) == entry
    _rewrite_weights_and_manifest(entry)
    # The replica refuses it (and refills it from the source where the cache is writable) ...
    repaired = ensure_cached(MINILM, cache, "sha256", digests)
    from serving.weights import manifest_digest

    assert manifest_digest(verify_entry(repaired)["files"]) == recorded
    # ... and the init container's prefetch does not trust a tampered entry either: it re-checks it
    # against the source and refills it.
    _rewrite_weights_and_manifest(repaired)
    again = prefetch(MINILM, cache, digests)
    assert manifest_digest(verify_entry(again)["files"]) == recorded


def test_a_read_only_cache_with_a_bad_or_unrecorded_entry_is_never_loaded(tmp_path, monkeypatch):
    import errno

    import serving.weights as weights

    cache, digests = tmp_path / "cache", tmp_path / "digests"
    entry = prefetch(MINILM, cache, digests)

    def read_only(entry):  # what os.replace meets on the Ray container's read-only mount
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(weights, "_move_aside", read_only)
    # A digest directory that never saw this entry: refuse rather than trust the cache.
    with pytest.raises(CacheCorrupt, match="no digest recorded for it"):
        ensure_cached(MINILM, cache, "size", tmp_path / "elsewhere")
    _rewrite_weights_and_manifest(entry)
    with pytest.raises(CacheCorrupt, match="does not match the digest recorded.*read-only here"):
        ensure_cached(MINILM, cache, "size", digests)


def test_cli_prefetch_records_the_digest(tmp_path, capsys):
    assert main(["prefetch", MINILM, "--cache-dir", str(tmp_path / "c"), "--digest-dir", str(tmp_path / "d")]) == 0
    assert len(list((tmp_path / "d").glob("*.sha256"))) == 1
