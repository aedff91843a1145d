"""The import contract (``.importlinter``): lint-imports over the installed package, in CI.

``hetero.cpu``, ``hetero.gpu`` and ``hetero.retrieval`` live in their own folders (setuptools ``package-dir``), so
in an editable install they are not inside ``hetero/`` where grimp looks for submodules: the test then lays out
the package as a wheel installs it, in symlinks, and lints that."""
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = Path(__file__).resolve().parent.parent / ".importlinter"
MAPPED = ("cpu", "gpu", "retrieval")


def _as_installed(root: Path) -> Path:
    """A folder where ``hetero`` and its mapped subpackages sit as in a wheel (symlinks to the sources)."""
    import hetero

    src = Path(hetero.__path__[0])
    if all(Path(importlib.import_module(f"hetero.{m}").__path__[0]).parent == src for m in MAPPED):
        return src.parent  # already so (a regular install)
    pkg = root / "hetero"
    pkg.mkdir()
    for entry in src.iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for m in MAPPED:
        (pkg / m).symlink_to(Path(importlib.import_module(f"hetero.{m}").__path__[0]))
    return root


def _lint(config: Path, tmp_path: Path, edit=None) -> subprocess.CompletedProcess:
    """lint-imports over the installed layout; ``edit(site)`` may return another tree to lint instead."""
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports not installed (the test extra has import-linter)")
    site = _as_installed(tmp_path / "site")
    if edit is not None:
        site = edit(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([exe, "--no-cache", "--no-logo", str(config)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


@pytest.mark.skipif(not CONFIG.exists(), reason="no .importlinter beside tests/ (the source tree's contract)")
def test_import_contract_is_kept(tmp_path):
    (tmp_path / "site").mkdir()
    p = _lint(CONFIG, tmp_path)
    assert p.returncode == 0 and "broken" not in p.stdout.lower().replace("0 broken", ""), p.stdout + p.stderr
    assert "3 kept" in p.stdout, p.stdout


@pytest.mark.skipif(not CONFIG.exists(), reason="no .importlinter beside tests/ (the source tree's contract)")
def test_a_forbidden_import_breaks_the_contract(tmp_path):
    def add_forbidden_imports(site: Path) -> Path:
        if not (site / "hetero" / "attention.py").is_symlink():  # a regular install: edit a copy, never it
            shutil.copytree(site / "hetero", tmp_path / "copy" / "hetero", symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
            site = tmp_path / "copy"
        target = site / "hetero" / "attention.py"
        text = target.read_text()
        target.unlink()
        target.write_text(text + "\n\ndef _bad():\n    import hetero.cpu.torch_sparse\n    import hetero.tools.cli\n")
        return site

    (tmp_path / "site").mkdir()
    p = _lint(CONFIG, tmp_path, add_forbidden_imports)
    assert p.returncode != 0, p.stdout
    assert "hetero.attention -> hetero.cpu.torch_sparse" in p.stdout and "hetero.attention -> hetero.tools.cli" in p.stdout, \
        p.stdout
