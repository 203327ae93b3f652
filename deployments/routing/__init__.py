"""Which engine replica serves a request: Serve request routers and their pure parts."""
