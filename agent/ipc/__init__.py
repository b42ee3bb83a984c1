"""Messages between the supervisor and its worker processes, and their framing."""
