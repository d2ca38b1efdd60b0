"""edgetune.server: the aggregation server and its strategies."""
