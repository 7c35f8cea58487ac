"""The algorithms: MAXL (maxl.py with its losses), and MeLa's meta-learner, labeler and evaluation."""
