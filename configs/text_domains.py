"""Text domains: BBC topic (5-way) → airline → apple → coachella → other tweet sentiment (3-way),
task-incremental (one linear head per task, the task id known at test time). Frozen
all-MiniLM-L6-v2 (max_len 48 tokens: 99 % of the tweets; BBC keeps its headline and lead);
Share and LoRA adapt attention query/value of the top 3 of its 6 layers, the bottom 3 run once
per task (``frozen_layers=3``), which halves the CPU cost of every step. 100 training and 50 test
examples per class, 4 epochs, batch 32.

    python -m share_jax.run --config configs/text_domains.py --workdir runs/demo
    python -m share_jax.run --config configs/text_domains.py --workdir /tmp/q --config.quick=True

``--config.model_dir=/path/to/checkpoint`` swaps MiniLM for any local HF checkpoint (BERT, RoBERTa,
…: config.json + weights + tokenizer), keeping max_len and frozen_layers.
"""

from share_jax.experiments.config import default_config


def get_config():
  config = default_config()
  config.data.name = "text_domains"
  config.backbone = {"name": "minilm", "max_len": 48, "frozen_layers": 3}
  config.quick_overrides.backbone = {"name": "tiny_bert", "max_len": 16, "frozen_layers": 0}
  return config
