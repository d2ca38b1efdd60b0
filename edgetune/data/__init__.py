"""edgetune.data."""
