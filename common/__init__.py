"""Light modules shared by the API and the workers (no torch here)."""
