"""The export tool: a trained checkpoint becomes a verified Parley model package."""

EXPORTER_VERSION = "0.1.0"
