"""chatqueue's Celery tasks; :func:`tasks.chat.stream_chat` is registered by the app factory."""
