"""How far to trust an attribution: LDS and rank metrics (``metrics``), ground truth by
retraining (``retrain``) and the peer methods run from their own libraries (``baselines``)."""
