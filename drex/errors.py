"""The one exception type for problems a user can fix (bad config, missing or corrupt files,
checkpoints that do not fit the model). Command-line entry points print it as a single line."""


class UserError(ValueError):
  """A problem with the user's input, config or files; the message says what to do."""
