"""Errors the server side raises for a request."""


class InvalidInput(ValueError):
    """A request parameter is not acceptable; the message names it and what is allowed."""
