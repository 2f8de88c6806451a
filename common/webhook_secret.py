"""The webhook's shared secret: the header Label Studio's webhook must carry, and the model class /health shows.

Which webhook is this deployment's is decided by BACKEND_URL (worker/label_studio.py), never by what a server
answers: whatever this backend's /health shows, a copy of it can show too."""

from __future__ import annotations

HEADER = "X-Webhook-Secret"
MODEL_CLASS = "PlanktonEmbeddingClusters"
