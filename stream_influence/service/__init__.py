"""The streaming service: the run loop, checkpoints and policy hot reload."""
