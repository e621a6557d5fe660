"""Files shipped with the application: embedded models and preview factors."""

from pathlib import Path

RESOURCES_DIR = Path(__file__).resolve().parent
EMBEDDED_MODELS_DIR = RESOURCES_DIR / "models"
