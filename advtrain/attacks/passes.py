"""Cost accounting in example-passes, the unit every method reports its cost in.

One forward+backward on one example = 1 pass; a forward alone = 1/3 pass (a backward costs about two forwards).
Counts are plain Python numbers so counting never forces a device sync.
"""

FORWARD = 1.0 / 3.0  # passes per example for a forward without backward


class PassCounter:
    def __init__(self) -> None:
        self.total = 0.0  # example-passes so far

    def add(self, n_examples: int, passes: float = 1.0) -> None:
        self.total += n_examples * passes

    def reset(self) -> None:
        self.total = 0.0

    def state_dict(self) -> dict:
        return {'total': self.total}

    def load_state_dict(self, d) -> None:
        self.total = float(d['total'])
