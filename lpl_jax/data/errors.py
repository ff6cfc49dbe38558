"""The data error type."""


class DataError(ValueError):
  """Data a run names cannot be read: a missing folder, an undecodable image, a truncated or inconsistent latent
  cache. The message names the file."""
