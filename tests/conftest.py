import os

# Triton kernels run under the interpreter on machines without a GPU; must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
