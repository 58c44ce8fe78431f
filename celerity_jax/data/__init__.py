"""Token sources. Batches are a pure function of (seed, step) so resume is instant and exact."""


class DataError(Exception):
  """A missing, empty, corrupt or mismatched input; the CLI prints it and exits with status 3."""
