"""Flask front end that answers Label Studio's ML-backend calls. Never imports torch."""
