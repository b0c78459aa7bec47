"""Training: the pure train step and its parts (steps, losses, optim, state, sharding rules in
`jaxtrain.sharding`), checkpoints, and the loop that runs a job. `train.run(config, workdir)` is the library
entry point, validating the config exactly as the command line does."""

from jaxtrain.train.loop import run

__all__ = ['run']
