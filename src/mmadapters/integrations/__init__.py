"""Integrations with other tools (each module imports its tool; import them only where the tool is installed)."""
