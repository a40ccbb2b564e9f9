"""Shared fixtures: tiny dense models written to disk (nothing is downloaded)."""

import pytest
import torch

from upcycle.tiny import save_tiny_model

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def dense_dirs(tmp_path_factory):
    """{model_type: folder} for one tiny dense model of each supported family."""
    root = tmp_path_factory.mktemp("dense")
    return {t: save_tiny_model(t, root / t, seed=0) for t in MODEL_TYPES}


@pytest.fixture(scope="session")
def llama_dir(dense_dirs):
    return dense_dirs["llama"]


@pytest.fixture
def token_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(6, 128, (2, 10), generator=g)


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def kill_after_checkpoints(cmd, manifest, count, env, timeout=120):
    """Start `cmd`, SIGKILL it as soon as `manifest` lists `count` checkpoints; return the manifest then.

    The manifest is always read whole: a half-written one (which atomic writes rule out) fails the test."""
    import json
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if manifest.exists() and len(json.loads(manifest.read_text())["checkpoints"]) >= count:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return json.loads(manifest.read_text())
