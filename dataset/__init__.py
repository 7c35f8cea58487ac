"""Datasets: loaders for the original on-disk layouts, generated stand-ins, transforms and task samplers."""
