"""Evaluation: protocols and ground truth, reference metrics, re-ranking, the per-descriptor evaluation
stage, BoW evaluation, the compression study.
"""
