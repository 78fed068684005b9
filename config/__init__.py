"""Settings of chatqueue, read from the environment in this one place.

Every other module receives a :class:`Settings` (or plain values taken from
it); nothing else reads ``os.environ``. A bad value stops the process at start
with a :class:`ConfigError` that names the variable and says how to fix it.
"""

from __future__ import annotations

from config.settings import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "load_settings"]
