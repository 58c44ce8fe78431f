"""Token sources. Batches are a pure function of (seed, global row): resume is instant and exact."""


class DataError(Exception):
  """A missing, empty, corrupt or mismatched input; the CLI prints it and exits with status 3."""


class DataChanged(Exception):
  """The corpus or given tokenizer differs from what the checkpoint being resumed pinned; the loop
  words the refusal (checkpoint.refusal)."""

  def __init__(self, keys: list[str], found: dict):
    super().__init__(", ".join(keys))
    self.keys, self.found = keys, found
