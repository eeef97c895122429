"""Our top-level packages share names with unrelated PyPI packages (`kernels` is Hugging Face's kernel hub).

transformers probes for `kernels`; with ours installed it must not believe the hub package is there.
"""

from __future__ import annotations

import subprocess
import sys


def test_transformers_does_not_mistake_our_kernels_package():
    code = (
        "import kernels, glm, vlm, diffusion, multimodal\n"
        "assert kernels.__file__.startswith(multimodal.__file__.rsplit('/multimodal/', 1)[0]), kernels.__file__\n"
        "from transformers.utils import is_kernels_available\n"
        "import transformers, diffusers\n"
        "from transformers import GlmConfig\n"
        "from diffusers import CogView4Transformer2DModel\n"
        "print(is_kernels_available())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"
