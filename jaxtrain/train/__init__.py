"""Training: the pure train step and its parts (steps, losses, optim, state, checkpoint), the execution plan,
and the loop that runs a job (`loop.run` builds one for a plain decoder config; `jaxtrain.run` is the
library entry point for any config)."""
