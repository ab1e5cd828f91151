"""Teacher wrapper and student architectures."""
