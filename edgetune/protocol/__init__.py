"""edgetune.protocol."""
