"""``python -m share_jax.run``: the continual-learning runner of ``share_jax.experiments.run``
(needs the ``experiments`` extra). Kept here so the README's command stays short."""

if __name__ == "__main__":
  import sys

  from share_jax.experiments.run import main

  sys.exit(main())
