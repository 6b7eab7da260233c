"""Packaging: our top-level packages must not shadow packages our dependencies import by name."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_and_diffusers_import_from_the_project_root():
    # `python -m trainer...` and torchrun put the working directory first on sys.path; a top-level folder there named
    # like a dependency (transformers imports the Hugging Face `kernels` package) would be imported in its place.
    code = (
        "import importlib.util, pathlib\n"
        "import transformers.integrations.hub_kernels, diffusers.utils.import_utils, ltx_kernels, trainer\n"
        "root = pathlib.Path.cwd().resolve()\n"
        "assert pathlib.Path(ltx_kernels.__file__).resolve().parent == root / 'ltx_kernels', ltx_kernels.__file__\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "assert spec is None or root not in pathlib.Path(spec.origin).resolve().parents, spec.origin\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_distribution_and_console_command():
    dist = importlib.metadata.distribution("ltx-lora")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"ltx-lora": "trainer.cli:main"}
    assert "Apache" in (dist.metadata.get("License-Expression") or dist.metadata.get("License") or "")
