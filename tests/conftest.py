import os

# as hetero sets it when imported before torch: torch is imported first here
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

CUDA = torch.cuda.is_available()
# Without a GPU the Triton kernels run under the interpreter; it must be chosen before triton is imported. With one,
# they compile for it, and the interpreter-only tests (CPU tensors through Triton) skip.
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(2)

try:  # hetero.cpu/gpu/retrieval are mapped into hetero at install: a bare source folder on sys.path lacks them
    import hetero.retrieval  # noqa: E402,F401
except ModuleNotFoundError as e:
    import hetero  # noqa: E402

    pytest.exit(f"hetero was imported from {os.path.dirname(hetero.__file__)}, a source folder, not the installed "
                f"package ({e}): run the tests from tests/ (cd tests && python -m pytest), or set PYTHONSAFEPATH=1",
                returncode=4)

NO_CUDA = ("needs a CUDA device: torch.cuda.is_available() is False here (torch "
           f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); run benchmarks/gpu_check.py on a GPU "
           "machine")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
