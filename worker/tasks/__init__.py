"""Celery tasks only, thin: each reads its arguments, calls the module that does the work, reports."""
