"""Evaluation: metrics, held-out evaluation with splicing, AFA, frontiers and plots, the promotion rule, and
synthetic ground truth."""
