"""Configuration package: everything configurable lives in :mod:`config.settings`."""

from config.settings import Settings, settings

__all__ = ["Settings", "settings"]
