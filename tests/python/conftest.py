"""Starts a real tessera-shard and tessera-router on SmolLM2 for the client-compatibility tests."""
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.request

import openai
import pytest
from huggingface_hub import InferenceClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / ".cache/models/smollm2-hf-float32"
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(base):
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            return r.status == 200
    except Exception:
        return False


@pytest.fixture(scope="session")
def base_url():
    for binary in ("tessera-shard", "tessera-router"):
        assert (TARGET / binary).exists(), f"build first: cargo build --workspace --bins ({binary})"
    assert MODEL.exists(), "fetch the model first: bash tests/fetch-models.sh"
    logs = pathlib.Path(tempfile.mkdtemp(prefix="tessera-pytest-"))
    uds = logs / "shard"
    port = _free_port()
    shard = subprocess.Popen(
        [TARGET / "tessera-shard", "serve", "--model-id", MODEL, "--uds-path", uds, "--kv-cache-memory", "300000000"],
        stdout=open(logs / "shard.log", "w"), stderr=subprocess.STDOUT)
    router = subprocess.Popen(
        [TARGET / "tessera-router", "--master-shard-uds-path", f"{uds}-0", "--tokenizer-name", MODEL,
         "--hostname", "127.0.0.1", "--port", str(port), "--max-batch-prefill-tokens", "512", "--model-id", "smollm2"],
        stdout=open(logs / "router.log", "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while not _healthy(base):
            if router.poll() is not None or shard.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start; logs in {logs}:\n" + (logs / "router.log").read_text())
            time.sleep(0.25)
        yield base
    finally:
        router.terminate()
        shard.terminate()
        router.wait(30)
        shard.wait(30)


@pytest.fixture(scope="session")
def oai(base_url):
    """The official openai SDK with its strict response validation."""
    return openai.OpenAI(base_url=base_url + "/v1", api_key="-", _strict_response_validation=True)


@pytest.fixture(scope="session")
def hub(base_url):
    return InferenceClient(base_url=base_url)
