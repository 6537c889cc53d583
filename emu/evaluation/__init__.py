"""Evaluation: the toy world's judges, pairwise statistics, the rating study and its page, image metrics, charts."""
