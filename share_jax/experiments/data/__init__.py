"""Local datasets (tfds builders over installed assets) and continual-learning task sequences."""

from share_jax.experiments.data.bbc_news import BbcNews
from share_jax.experiments.data.builder import LocalBuilder, load
from share_jax.experiments.data.fashion_mnist import FashionMnistLocal, read_idx
from share_jax.experiments.data.sources import DATA_DIR_ENV, default_data_dir
from share_jax.experiments.data.tasks import (
  Task,
  bbc_class_incremental,
  clean_tweet,
  split_fashion_mnist,
  text_domain_sequence,
)
from share_jax.experiments.data.tweet_sentiment import TweetSentiment, domain_of

__all__ = [
  "DATA_DIR_ENV",
  "BbcNews",
  "FashionMnistLocal",
  "LocalBuilder",
  "Task",
  "TweetSentiment",
  "bbc_class_incremental",
  "clean_tweet",
  "default_data_dir",
  "domain_of",
  "load",
  "read_idx",
  "split_fashion_mnist",
  "text_domain_sequence",
]
