"""Training methods as plug-ins over one loop: each module holds one method; METHODS maps config names to them."""
from advtrain.methods.base import Method
from advtrain.methods.deat import DEAT
from advtrain.methods.fgsm_rs import FGSMRS
from advtrain.methods.free import FreeAT
from advtrain.methods.gaat import GAAT
from advtrain.methods.natural import Natural
from advtrain.methods.pgd import PGDAT
from advtrain.methods.trades import TRADES

METHODS: dict[str, type[Method]] = {m.name: m for m in (Natural, PGDAT, FGSMRS, FreeAT, TRADES, DEAT, GAAT)}


def build_method(cfg, info) -> Method:
    return METHODS[cfg.name](cfg, info)
