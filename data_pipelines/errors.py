"""The one error type for bad input data: its message names the file and the problem."""


class DataError(ValueError):
  """Input data that cannot be used as it is (missing, corrupt, inconsistent)."""
