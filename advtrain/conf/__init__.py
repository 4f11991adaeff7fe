"""advtrain's Hydra config groups. Importing the package (as Hydra's compose API does) registers the resolvers
the configs name, so they compose outside the `advtrain` command too, e.g. in tests and notebooks."""
from advtrain.sweep import register_resolvers

register_resolvers()
