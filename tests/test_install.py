"""The repository as a user runs it: from its root, where `python -m` and pytest put the root first
on sys.path, so a top-level folder there can shadow an installed package of the same name."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["speedx.generate", "speedx.serve", "speedx.align", "speedx.train", "speedx.eval", "speedx.embed.mine",
                "speedx.demo"]


def run_in_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_no_top_level_entry_is_an_importable_package_but_speedx():
    importable = sorted(p.name for p in ROOT.iterdir()
                        if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py")
    assert importable == ["speedx"], f"{importable}: a package in the repository root shadows an installed one"


def test_installed_packages_win_over_top_level_folders_of_the_same_name():
    """kernels/ holds our Triton sources (installed as speedx.kernels); transformers imports Hugging
    Face's `kernels` distribution, which must be what `import kernels` finds in the repository root."""
    installed = packages_distributions()
    clashes = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name in installed and p.name != "speedx")
    assert "kernels" in clashes  # transformers depends on it: the case this test exists for
    result = run_in_root(f"""
        import importlib
        for name in {clashes!r}:
            module = importlib.import_module(name)
            ours = {str(ROOT)!r} + "/" + name + "/"
            assert getattr(module, "__file__", None) and not module.__file__.startswith(ours), (name, module.__path__)
        import transformers.modeling_utils
        from transformers.integrations import hub_kernels
        """)
    assert result.returncode == 0, result.stderr


def test_no_script_shadows_an_installed_module_from_its_folder():
    """`python bench/x.py` puts bench/ first on sys.path: bench/kernels.py once shadowed HF's kernels."""
    installed = packages_distributions()
    clashes = [str(p.relative_to(ROOT)) for folder in ("bench", "tests") for p in (ROOT / folder).glob("*.py")
               if p.stem in installed]
    assert clashes == []


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_command_starts_from_the_repository_root(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


def test_model_stacks_import_from_the_repository_root():
    result = run_in_root("""
        import transformers.modeling_utils, peft, trl, sentence_transformers
        from transformers import LlamaForCausalLM
        import speedx.engine.llm, speedx.synth.cli_run, speedx.align.training, speedx.embed.trainer
        import speedx.serving.app, speedx.embed.evaluation
        """)
    assert result.returncode == 0, result.stderr


def test_a_source_tree_without_the_build_stops_at_once_saying_what_to_do(tmp_path):
    """As after `pip install .` (not editable) with Python started in the repository root: its speedx/
    is imported, which has neither the built speedx._C nor speedx.kernels."""
    shutil.copytree(ROOT / "speedx", tmp_path / "speedx", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    # -S: no site-packages, so no editable install redirects `speedx` to the real tree
    result = subprocess.run([sys.executable, "-S", "-c", "import speedx"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: speedx was imported from") and "lacks speedx._C and speedx.kernels" in message
    assert "run Python outside the speedx repository" in message and "pip install -e ." in message
