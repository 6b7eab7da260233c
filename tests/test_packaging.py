"""Packaging: our `kernels` package must not pass for the Hugging Face `kernels` distribution diffusers probes for."""

import importlib.metadata
import subprocess
import sys


def test_diffusers_does_not_take_our_kernels_for_hub_kernels():
    # A fresh interpreter, so diffusers runs its import-time probe with our package importable.
    code = (
        "import kernels, diffusers.utils.import_utils as iu\n"
        "assert getattr(kernels, 'LTX_LORA_KERNELS', False), kernels.__file__\n"
        "print(iu.is_kernels_available())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_distribution_and_console_command():
    dist = importlib.metadata.distribution("ltx-lora")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"ltx-lora": "trainer.cli:main"}
    assert "Apache" in (dist.metadata.get("License-Expression") or dist.metadata.get("License") or "")
