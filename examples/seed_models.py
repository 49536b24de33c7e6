"""The three seed models (example models in plain PyTorch), their data and a small trainer: they live in the package, as
``pydlx.bench.seed_models`` (the model benchmark family runs them from an installed pydlx too); this file makes them
importable by name from examples/ (``import seed_models``), as examples/train_seed_models.py does."""
from pydlx.bench.seed_models import *  # noqa: F401,F403
from pydlx.bench.seed_models import __doc__ as _doc  # noqa: F401
