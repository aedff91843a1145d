import subprocess
import sys


def test_subpackages_install_under_hetero_only(tmp_path):
    code = (
        "import hetero.gpu, hetero.cpu, hetero.retrieval, importlib.util\n"
        "assert all(importlib.util.find_spec(m) is None for m in ('gpu', 'cpu', 'retrieval')), 'top-level leak'\n"
        "print('ok')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_import_is_light(tmp_path):
    """Importing hetero must not pull in heavy optional modules (they load with their backend)."""
    code = ("import sys, hetero\n"
            "heavy = [m for m in ('triton', 'numba', 'faiss', 'transformers') if m in sys.modules]\n"
            "print(heavy)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
