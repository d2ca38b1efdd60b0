"""edgetune.models."""
