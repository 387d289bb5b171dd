"""Scripts run against a live stack (`make demo`); not part of any service."""
