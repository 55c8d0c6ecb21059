"""The one exception type for bad input: launch.py prints its message as one line and exits 2."""


class UserError(Exception):
  """Bad input (config, data, paths): the message names the culprit and the fix."""
