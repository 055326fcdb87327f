import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402  (the environment above must be set before anything imports transformers)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: on shared CI cores a second intra-op thread only adds contention (10-50x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
