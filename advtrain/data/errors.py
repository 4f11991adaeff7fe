"""The data package's user-facing error (missing or corrupt files, bad sizes), defined with the others in
advtrain.errors."""
from advtrain.errors import DataError

__all__ = ["DataError"]
