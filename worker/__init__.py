"""Celery workers: embeddings, clustering and write-back. Only this package loads models."""
