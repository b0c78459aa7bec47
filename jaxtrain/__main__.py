"""`python -m jaxtrain COMMAND ...`: the same as the `jaxtrain` console script."""

from jaxtrain.cli import main

main()
