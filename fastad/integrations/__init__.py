"""Adapters for other tools; each submodule imports its tool and is optional (``fastad.integrations.anomalib``)."""
