"""The credit API's routers, one per topic."""
