"""Settings: the one place that reads environment variables, and their pure mappings onto vLLM
engine arguments and Ray Serve options."""

from configs.loader import SettingsError, load_settings
from configs.settings import Accelerator, PlacementStrategy, Settings

__all__ = ["Accelerator", "PlacementStrategy", "Settings", "SettingsError", "load_settings"]
