"""Evaluation: segmentation, classification and synthesis metrics with bootstrap confidence intervals."""
