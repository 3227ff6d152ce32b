"""``python -m share_jax``: the ``share-jax`` command line."""

from share_jax.cli import main

raise SystemExit(main())
