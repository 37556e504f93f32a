import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # the shared helpers (_tiny_ctf.py, _train_toy.py)

# LlamaGen's tensor manifests live in shared/ beside the checkout (CI clones main next to it), or
# wherever $CTFGEN_SHARED points.
LLAMAGEN_MANIFESTS = Path(os.environ.get("CTFGEN_SHARED", TESTS.parents[1] / "shared")) / "llamagen"


def _have_fashion_mnist() -> bool:
    from ctfgen.data.fashion_mnist import find_fashion_mnist

    try:
        find_fashion_mnist()
        return True
    except FileNotFoundError:
        return False


import pytest  # noqa: E402

needs_fmnist = pytest.mark.skipif(not _have_fashion_mnist(), reason="Fashion-MNIST IDX files not installed: run `make data`")
