"""Continual-learning experiments on a frozen backbone (runner: ``python -m share_jax.run``).

Modules: ``backbones`` (the ``Backbone`` abstraction, MiniLM and a tiny random BERT), ``vision``
(a small self-pretrained ViT), ``fitting`` (encoded tasks, heads, minibatch loops),
``methods`` (Share, Share-full and the LoRA / head-only baselines), ``metrics`` (ACC, BWT,
forgetting, FWT), ``report`` and ``plots`` (results.json, the table, accuracy.png), ``config``
(defaults of ``configs/*.py``) and ``synthetic`` (tasks for smoke runs without the datasets).
"""
