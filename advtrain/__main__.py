"""`python -m advtrain ...` is the `advtrain` command; launchers that need a module take it this way, e.g.
`torchrun --nproc_per_node=4 -m advtrain method=pgd hydra.run.dir=outputs/pgd4`."""
from advtrain.cli import train

if __name__ == "__main__":
    train()
