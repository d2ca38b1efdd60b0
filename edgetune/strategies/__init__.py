"""edgetune.strategies."""
