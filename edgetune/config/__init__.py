"""edgetune.config."""
