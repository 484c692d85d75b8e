"""Every example, run the way its docstring tells users to run it."""

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.integration.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_text_generation_example_serves_a_local_model(deploy, tiny_lm_dir, monkeypatch):
    monkeypatch.setenv("GPUSERVE_MODEL_PATH", str(tiny_lm_dir))
    monkeypatch.setenv("GPUSERVE_GPUS", "0")
    monkeypatch.setenv("GPUSERVE_MAX_REPLICAS", "1")
    sys.modules.pop("examples.text_generation", None)
    example = importlib.import_module("examples.text_generation")
    assert example.spec.autoscaling.max_replicas == 1
    client = deploy(example.app, "example-llm", "/example-llm")
    r = client.post("/v1/completions", json={"model": "my-llm", "prompt": "Hello", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_text_generation_example_explains_a_missing_model_path():
    env = {k: v for k, v in os.environ.items() if k != "GPUSERVE_MODEL_PATH"}
    out = subprocess.run(
        [sys.executable, "-c", "import examples.text_generation"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "GPUSERVE_MODEL_PATH is not set" in out.stderr


def test_quickstart_yaml_with_gpuserve_run(tmp_path):
    """`gpuserve run examples/quickstart.yaml` on its own local Ray, as `make serve` does.

    Only the port is changed (to a free one) so the test never collides with a
    developer's running server; the import path and app come from the file.
    """
    config = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    assert config["applications"][0]["import_path"] == "examples.quickstart:app"
    port = free_port()
    config["http_options"]["port"] = port
    cfg_path = tmp_path / "quickstart.yaml"
    cfg_path.write_text(yaml.safe_dump(config))

    # RAY_ADDRESS=local: `serve run` starts its own Ray even if another cluster runs on this machine.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    gpuserve = Path(sys.executable).with_name("gpuserve")
    proc = subprocess.Popen(
        [str(gpuserve), "run", str(cfg_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("quickstart did not become ready in 240 s")
        texts = ["A man is playing a guitar.", "Someone is playing the guitar.", "The stock market fell sharply today."]
        r = httpx.post(base + "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": texts}, timeout=30)
        assert r.status_code == 200, r.text
        v = np.array([d["embedding"] for d in r.json()["data"]])
        assert v.shape == (3, 384)
        assert v[0] @ v[1] > v[0] @ v[2]
    finally:
        # Ctrl-C, as a user would: serve run shuts Serve and its Ray down.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_custom_task_example_answers_openai_clients_from_its_faq(deploy):
    """docs/tasks.md's example: a user task (by import path) serving /v1/completions with a real model."""
    import openai

    sys.modules.pop("examples.custom_task", None)
    example = importlib.import_module("examples.custom_task")
    client = deploy(example.app, "faq", "/faq")
    assert client.get("/health").json()["task"] == "examples.custom_task:FaqTask"
    with openai.OpenAI(base_url=str(client.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0) as oa:
        r = oa.completions.create(model="faq", prompt="Why is a fresh GPU node so slow to start serving?")
        assert r.choices[0].text == example.FAQ["Why does a new GPU node take minutes to serve?"]
        r = oa.completions.create(model="faq", prompt="The queue is full and my request was rejected: what should I do?")
        assert r.choices[0].text == example.FAQ["What happens when the queue is full?"]
        assert r.usage.prompt_tokens > 0
        with pytest.raises(openai.BadRequestError) as ei:
            oa.completions.create(model="faq", prompt="x", extra_body={"suffix": "?"})
        assert ei.value.code == "invalid_extra_forbidden" and "suffix" in ei.value.body["message"]
    # Chat is not one of its endpoints: a 404 that names what it serves.
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and "/v1/completions" in r.json()["error"]["message"]
