"""Moved to :mod:`amygdala_dagster.storage` (the core library); kept so existing imports work."""

from amygdala_dagster.storage import Store, is_local, location  # noqa: F401
