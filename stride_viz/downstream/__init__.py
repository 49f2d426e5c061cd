"""Downstream uses of attribution scores: data selection (select.py), verification by
retraining (verify.py) and the other uses that live here."""
