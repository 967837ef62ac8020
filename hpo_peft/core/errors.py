"""The one exception type for mistakes a user can make (bad config, bad data, bad adapter).

The CLI turns it into a one-line message and exit code 2; everything else is a bug."""


class UserError(Exception):
    """A problem in the user's input; the message names the file, row or key."""
