"""edgetune.adapters."""
