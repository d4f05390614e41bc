"""Long-running consumers: the applier (destination site) and the source agent (source site)."""
