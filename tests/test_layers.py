"""The library stays lean: importing it (and its public modules) pulls no runner dependency."""

import subprocess
import sys

RUNNER_ONLY = ("tensorflow_datasets", "matplotlib", "ml_collections", "tokenizers", "tqdm", "torch")
LIBRARY = (
  "share_jax",
  "share_jax.checkpoint",
  "share_jax.peft_io",
  "share_jax.sharding",
  "share_jax.serving",
  "share_jax.cli",
)


def test_library_imports_no_runner_dependency():
  code = (
    "import importlib, sys\n"
    f"for m in {LIBRARY!r}: importlib.import_module(m)\n"
    f"print(sorted(m for m in {RUNNER_ONLY!r} if m in sys.modules))\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_runner_is_importable_with_the_extra():
  import share_jax.experiments.run as run

  assert callable(run.main)
