"""The one base class of "this input is wrong" errors.

A bad file, row or option raises a subclass of `InputError` whose message names the file
(and row, byte offset or option) and says what is wrong; the CLI prints it as one
`cxrjax <command>: error:` line and exits with status 2. Anything else is a bug and keeps
its traceback. This module imports nothing, so catching the class costs nothing.
"""


class InputError(ValueError):
    """Bad input, named in the message. A ValueError, so older `except ValueError` still works."""
