"""A 4-layer llama-tiny and a 3-layer qwen2-tiny (which has ``layer_types``), built once per run."""

import pytest


@pytest.fixture(scope="session")
def tiny4(tmp_path_factory):
    from llmctl.core.models.init import init_model

    directory = tmp_path_factory.mktemp("prune") / "llama-tiny-4"
    directory.mkdir()
    init_model("llama-tiny", directory, seed=0, overrides={"num_hidden_layers": 4})
    return directory


@pytest.fixture(scope="session")
def qwen3(tmp_path_factory):
    from llmctl.core.models.init import init_model

    directory = tmp_path_factory.mktemp("prune") / "qwen2-tiny-3"
    directory.mkdir()
    init_model("qwen2-tiny", directory, seed=0, overrides={"num_hidden_layers": 3})
    return directory


def load(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).eval()


def calib_ids(vocab=259, samples=6, seq=24, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (samples, seq), generator=g)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster than two fighting a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
