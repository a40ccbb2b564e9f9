"""The one exception type the CLI turns into a clean one-line error and a non-zero exit."""


class UpcycleError(Exception):
    """A problem with the user's input (file, key or value) that they can fix.

    `problems` holds every message when several were found at once (config validation reports all).
    """

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))
