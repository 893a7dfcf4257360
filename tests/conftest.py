import json
import os

import pytest

from cerbero_ray.config import REPO_DIR
from cerbero_ray.tokenizer import SYSTEM_LINE, build_tokenizer

SHARED_DATA = os.environ.get("CERBERO_DATA_DIR", os.path.join(REPO_DIR, "..", "shared", "data"))
SAMPLES = os.path.join(REPO_DIR, "data", "samples")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="session")
def ray_local():
    """One embedded 2-CPU Ray for the in-process integration tests."""
    from cerbero_ray.runtime import init_ray, shutdown_ray

    init_ray({"num_cpus": 2, "dashboard": True})  # Ray Train polls the state API, which needs it
    yield
    shutdown_ray()


def proc_cfg(out, sources, **data):
    """A plain-dict config for BufferProcessor / run_data."""
    d = {"sources": sources, "seq_len": 512, "loss_on": "assistant", "packing": "whole", "long_docs": "split",
         "buffer_docs": 4096, "workers": None, "seed": 0, "compression": "zstd", "output_dir": str(out),
         "overwrite": False}
    d.update(data)
    return d


TOKENIZER_CFG = {"path": None, "assistant_tag": "AI", "system_line": SYSTEM_LINE}


def write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode())
            f.write(b"\n")
    return str(path)
