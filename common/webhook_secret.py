"""The webhook's shared secret: the header Label Studio's webhook must carry, and the names /health shows.

Which webhook is this deployment's is decided by BACKEND_URL (worker/label_studio.py), never by what a server
answers: whatever this backend's /health shows, a copy of it can show too."""

from __future__ import annotations

import hashlib
import hmac

HEADER = "X-Webhook-Secret"
MODEL_CLASS = "PlanktonEmbeddingClusters"


def instance_id(secret: str) -> str:
    """Shown by /health, for whoever runs several deployments: the same for the API and the workers of one,
    and says nothing usable about a long random secret. Empty without a secret. Proves nothing: anyone can
    read it and show it."""
    if not secret:
        return ""
    return hmac.new(secret.encode(), b"plankton-ml-backend instance", hashlib.sha256).hexdigest()[:16]
