"""Natural (standard) training: the reference point every robust method is compared with."""
from advtrain.methods.base import Method


class Natural(Method):
    pass
