"""The one exception type users see: a single line naming the problem and the fix."""


class RealignError(Exception):
    """Bad input or an unusable environment.

    The message is one line: what is wrong, then how to fix it. The CLI prints it without a traceback
    and exits with status 2; the stage run that was open is marked FAILED with the message as a tag.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} — {fix}")
