"""The package's foundations, imported by every layer above: errors, registries, the run folder's schema, value specs, paths and file writes."""
