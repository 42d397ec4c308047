"""The security suite attacks the real paths with the trainer tests' tiny model."""

from tests.trainer.conftest import tiny_base, tiny_model_dir  # noqa: F401  (fixtures)
