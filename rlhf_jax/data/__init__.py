"""Datasets, builders and input pipelines."""
