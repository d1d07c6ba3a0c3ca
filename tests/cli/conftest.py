"""The CLI tests run the node as the admin does; they share the intake tests' node fixtures."""

from tests.dicom.conftest import database_url, node, node_factory  # noqa: F401  (fixtures)
