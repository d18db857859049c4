"""What serves the model: the synchronous engine (server.engine) and, above it, the
async bridge and HTTP API."""
import model  # noqa: F401  (first: its environment for torch's allocator, see model/__init__.py)
