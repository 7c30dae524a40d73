"""The compiled extension's loading: build facts, and the message of a source tree never built."""
import os
import shutil
import subprocess
import sys

import trpo_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_info_keys():
    info = trpo_ext.build_info()
    assert set(info) >= {"cuda", "cuda_version", "cuda_archs", "torch", "cuda_available"}
    # deprecated, kept for one release: no run-time choice of CPU instruction set any more
    assert info["cpu_isa"] == info["cpu_isa_supported"] == "compiler"


def test_unbuilt_source_tree_says_how_to_build(tmp_path):
    # A copy of the package without its compiled file, as in a fresh clone.
    shutil.copytree(os.path.join(ROOT, "trpo_ext"), tmp_path / "trpo_ext",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "share", "__pycache__"))
    proc = subprocess.run([sys.executable, "-c", "import trpo_ext"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: trpo_ext: the extension is not built here"), proc.stderr
    assert "bash scripts/setup.sh" in last and "pip install --no-build-isolation -e ." in last
    assert "another torch" not in proc.stderr
