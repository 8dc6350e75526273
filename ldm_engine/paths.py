"""Where the package's own files are: the bundled models (torch-free, so `ldm --help` stays fast)."""

from pathlib import Path

# Models shipped inside the package (ldm_engine/models/<name>), written only by `make train-default`.
BUNDLED_MODELS = Path(__file__).resolve().parent / "models"
# The default model: the one `ldm generate` uses without --model.
BUNDLED_MODEL = BUNDLED_MODELS / "default"
