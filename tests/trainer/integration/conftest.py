"""The KMock cluster of the operator's integration tests, reused for the trainer agent."""

from tests.operator.integration.conftest import cluster  # noqa: F401  (the fixture, registered here)
