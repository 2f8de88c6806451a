"""The webhook's shared secret: the header Label Studio's webhook must carry, and how a worker recognises
this deployment among a project's ML backends before it adds that header to their webhook."""

from __future__ import annotations

import hashlib
import hmac

HEADER = "X-Webhook-Secret"
MODEL_CLASS = "PlanktonEmbeddingClusters"


def instance_id(secret: str) -> str:
    """Shown by /health: the same for the API and the workers of one deployment, and says nothing usable
    about a long random secret. Empty without a secret."""
    if not secret:
        return ""
    return hmac.new(secret.encode(), b"plankton-ml-backend instance", hashlib.sha256).hexdigest()[:16]
