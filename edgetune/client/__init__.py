"""edgetune.client."""
