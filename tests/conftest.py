"""Shared fixtures. Expensive artefacts (tiny model, scenes benchmark) are built once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A freshly built offline tiny Qwen2-VL (model + tokenizer + processor + cocoa.json)."""
    from cocoa.tiny.build import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2-vl", arch="qwen2-vl", seed=0)


@pytest.fixture(scope="session")
def scenes_root(tmp_path_factory):
    """A small scenes benchmark: root/original (PairRecord) and root/eval/<dataset> (EvalRecord)."""
    from cocoa.sources.scenes import build_benchmark

    root = tmp_path_factory.mktemp("scenes")
    build_benchmark(root, n_train=240, eval_per_task=12, n_distractors=15, seed=0)
    return root


@pytest.fixture
def one_thread():
    """One intra-op thread: deterministic and much faster on 2 shared, busy cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
