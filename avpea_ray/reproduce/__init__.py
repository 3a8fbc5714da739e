"""Reproducing the paper: its numbers (`paper.yaml`), every row as a Ray Tune trial over the
trainer (`run.py`), and the tables written back beside the measured numbers (`tables.py`)."""
