"""Names of chatqueue's Celery tasks."""

STREAM_CHAT = "chatqueue.stream_chat"
