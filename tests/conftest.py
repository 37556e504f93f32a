import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # the shared helpers (_tiny_ctf.py, _train_toy.py)

# Every tensor name and shape of LlamaGen's released VQ-16, VQ-8 and GPT-B checkpoints, read off
# the published files; kept in the repository so a bare clone tests against them.
LLAMAGEN_MANIFESTS = TESTS / "data" / "llamagen"


def _have_fashion_mnist() -> bool:
    from ctfgen.data.fashion_mnist import find_fashion_mnist

    try:
        find_fashion_mnist()
        return True
    except FileNotFoundError:
        return False


import pytest  # noqa: E402

needs_fmnist = pytest.mark.skipif(not _have_fashion_mnist(), reason="Fashion-MNIST IDX files not installed: run `make data`")
