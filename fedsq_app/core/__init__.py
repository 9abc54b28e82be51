"""The method: FedSQ and what its server does with replies. Imports nothing else of fedsq_app.

- ``dualcopy.py``: DualCopy, a frozen structural copy S gating a trainable copy Q (pure torch);
  ``gateable.py``: which models it can gate (``check_gateable``, ``UnsupportedActivationError``).
- ``strategy.py``: the Flower strategies (FedSQ, the validated FedAvg, baselines, variants); no torch.
- ``replies.py``, ``defenses.py``, ``aggregation.py``: reply checks, the default defenses and the averages,
  as pure functions; ``evaluation.py``: federated evaluation's replies screened and weighted;
  ``wire.py``: every key that travels, and the S-hash check.
"""
