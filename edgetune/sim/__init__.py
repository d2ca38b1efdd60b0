"""edgetune.sim."""
