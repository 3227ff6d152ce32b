"""GLUE as in the paper: CoLA → MRPC → RTE → STS-B → QNLI → SST-2, task-incremental (one head
per task; STS-B a 1-output regression head), on any local HF checkpoint (RoBERTa-base in the
paper), from the standard GLUE folder. Scores: Matthews correlation (CoLA), Pearson (STS-B),
accuracy (the rest); ``--config.data.metrics.MRPC=f1`` or ``.STS-B=spearman`` to change one.
The test split is each task's dev.tsv (GLUE's test labels are hidden).

    python -m share_jax.run --config configs/glue.py --workdir runs/glue \
      --config.data_dir=/data/glue_data --config.model_dir=/models/roberta-base

Share and LoRA adapt every layer's attention query/value (rank 8, k ≤ 32 as in the official
code). ``data.max_train`` / ``data.max_test`` cap each task's examples (0 = all);
``--config.quick=True`` caps them at 16 and trains one epoch, for smoke tests on tiny folders.
"""

from ml_collections.config_dict import placeholder

from share_jax.experiments.config import default_config
from share_jax.experiments.glue import PAPER_SEQUENCE


def get_config():
  config = default_config()
  config.data_dir = placeholder(str)  # the GLUE folder: CoLA/, MRPC/, RTE/, STS-B/, QNLI/, SST-2/
  config.data.name = "glue"
  config.data.tasks = PAPER_SEQUENCE
  config.data.max_train = 0
  config.data.max_test = 0
  config.data.metrics = {"CoLA": "matthews", "MRPC": "accuracy", "STS-B": "pearson"}
  config.backbone = {"name": "hf", "max_len": 128, "frozen_layers": 0, "pooling": "cls"}
  config.train.epochs = 3
  config.share.max_k = 32
  config.quick_overrides.data = {"max_train": 16, "max_test": 16, "num_tasks": 0}
  config.quick_overrides.train = {"batch_size": 8, "eval_batch_size": 16, "epochs": 1}
  config.quick_overrides.backbone = {"max_len": 24}
  return config
