"""Packaging: our top-level packages must not shadow packages our dependencies import by name."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_top_level_package_of_ours_is_named_like_an_installed_one():
    # `python -m trainer...` and torchrun put the working directory first on sys.path, so a top-level folder here named
    # like a dependency's package (transformers imports the Hugging Face `kernels` package) is imported in its place.
    owners = importlib.metadata.packages_distributions()
    ours = sorted(path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file())
    assert {"ltx_kernels", "trainer"} <= set(ours)
    clashes = {name: owners[name] for name in ours if set(owners.get(name, [])) - {"ltx-lora"}}
    assert clashes == {}


def test_transformers_and_diffusers_import_from_the_project_root():
    code = (
        "import pathlib\n"
        "import transformers.integrations.hub_kernels, diffusers.utils.import_utils, ltx_kernels, trainer\n"
        "found = pathlib.Path(ltx_kernels.__file__).resolve().parent\n"
        "assert found == pathlib.Path.cwd().resolve() / 'ltx_kernels', found\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_distribution_and_console_command():
    dist = importlib.metadata.distribution("ltx-lora")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"ltx-lora": "trainer.cli:main"}
    assert "Apache" in (dist.metadata.get("License-Expression") or dist.metadata.get("License") or "")
