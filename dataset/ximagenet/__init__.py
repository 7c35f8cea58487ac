"""Builds mini-60 / tiered-780 style few-shot datasets from an ImageNet training directory (see generate.py)."""
