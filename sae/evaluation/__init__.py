"""Evaluation: metrics, held-out evaluation with splicing, AFA, frontiers and plots, the promotion rule, synthetic ground truth."""
