"""Tiny offline assets in real formats: a random HF Flax RoBERTa checkpoint folder with a
word-level tokenizer, and a GLUE folder with every task's real column layout and quirks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = (
  "the a cat dog sat ran on mat fast slow good bad film movie is was not very what who "
  "where did does man woman saw liked hated paper read city big small"
).split()
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def tiny_tokenizer(directory: Path):
  """A RoBERTa-style (``<s> A </s></s> B </s>``) word-level fast tokenizer saved to
  ``directory`` so that ``AutoTokenizer.from_pretrained`` loads it offline."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
    single="<s> $A </s>",
    pair="<s> $A </s> </s> $B </s>",
    special_tokens=[("<s>", 0), ("</s>", 2)],
  )
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<pad>",
    unk_token="<unk>",
    mask_token="<mask>",
    cls_token="<s>",
    sep_token="</s>",
    model_input_names=["input_ids", "attention_mask"],
  )
  fast.save_pretrained(directory)
  return fast


def tiny_roberta(directory: Path, seed: int = 0) -> Path:
  """A random 2-layer, H=32 FlaxRobertaModel (``save_pretrained``) plus its tokenizer."""
  from transformers import FlaxRobertaModel, RobertaConfig

  config = RobertaConfig(
    vocab_size=len(SPECIAL) + len(WORDS),
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=40,
    type_vocab_size=1,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
  )
  FlaxRobertaModel(config, seed=seed).save_pretrained(directory)
  tiny_tokenizer(directory)
  return Path(directory)


def _sentence(rng: np.random.Generator, n: int = 5) -> str:
  return " ".join(rng.choice(WORDS, n))


def glue_folder(directory: Path, n_train: int = 12, n_dev: int = 8, seed: int = 0) -> Path:
  """All six tasks of the paper's sequence in the layout ``download_glue_data.py`` writes."""
  rng = np.random.default_rng(seed)
  root = Path(directory)

  def write(task: str, split: str, header: str | None, rows: list[list[str]], bom=False):
    (root / task).mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + ["\t".join(r) for r in rows]
    text = "\n".join(lines) + "\n"
    (root / task / f"{split}.tsv").write_text(("\ufeff" if bom else "") + text, encoding="utf-8")

  for split, n in (("train", n_train), ("dev", n_dev)):
    labels = [i % 2 for i in range(n)]
    # CoLA: no header; source, label, original judgement ('*' when unacceptable), sentence
    write(
      "CoLA",
      split,
      None,
      [["gj04", str(y), "" if y else "*", _sentence(rng) + " ."] for y in labels],
    )
    write("SST-2", split, "sentence\tlabel", [[_sentence(rng), str(y)] for y in labels])
    write(
      "MRPC",
      split,
      "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
      [
        [str(y), str(100 + i), str(200 + i), _sentence(rng), _sentence(rng)]
        for i, y in enumerate(labels)
      ],
      bom=split == "train",
    )
    ent = ["entailment", "not_entailment"]
    write(
      "RTE",
      split,
      "index\tsentence1\tsentence2\tlabel",
      [[str(i), _sentence(rng, 8), _sentence(rng), ent[y]] for i, y in enumerate(labels)],
    )
    write(
      "QNLI",
      split,
      "index\tquestion\tsentence\tlabel",
      [[str(i), _sentence(rng) + " ?", _sentence(rng, 8), ent[y]] for i, y in enumerate(labels)],
    )
    write(
      "STS-B",
      split,
      "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
      [
        [
          str(i),
          "main-news",
          "2012",
          "2012test",
          f"{i:04d}",
          "none",
          "none",
          _sentence(rng),
          _sentence(rng),
          f"{rng.uniform(0, 5):.3f}",
        ]
        for i in range(n)
      ],
    )
  with open(root / "STS-B" / "train.tsv", "a") as f:  # a real quirk: a row with an extra field
    f.write("99\tmain-forums\t2015\t2015test\t0099\tnone\tnone\tthe cat\ta dog\textra\t4.250\n")
  (root / "CoLA" / "test.tsv").write_text("index\tsentence\n0\tthe cat sat .\n")  # no labels
  return root
