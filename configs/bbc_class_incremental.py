"""BBC News split by topic into tasks: {business, tech} → {politics, entertainment, sports},
run task-incrementally (one head per task, the task id known at test time, as in the paper's
GLUE protocol). The data module's default 2-2-1 split would end with a 1-class task, which a
per-task head solves trivially, so this config uses 2 + 3 classes. Frozen all-MiniLM-L6-v2.

    python -m share_jax.run --config configs/bbc_class_incremental.py --workdir runs/bbc
    python -m share_jax.run --config configs/bbc_class_incremental.py --workdir /tmp/q \
      --config.quick=True
"""

from share_jax.experiments.config import default_config


def get_config():
  config = default_config()
  config.data.name = "bbc_class_incremental"
  config.data.splits = (("business", "tech"), ("politics", "entertainment", "sports"))
  config.backbone = {"name": "minilm", "max_len": 48, "frozen_layers": 3}
  config.quick_overrides.backbone = {"name": "tiny_bert", "max_len": 16, "frozen_layers": 0}
  return config
