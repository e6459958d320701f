"""The one error type of a request the client must change, shared by the routes and the input parsers."""


class ClientError(Exception):
    """A request the client must change: its HTTP status and a message that says how."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
