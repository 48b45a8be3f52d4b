"""REST API blueprints: one for agents talking to the server, one for users."""
