"""What serves the model: the synchronous engine (server.engine) and, above it, the
async bridge and HTTP API."""
