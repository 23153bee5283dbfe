__version__ = "0.1.0"

import warnings as _warnings
# fastai decorates a function with `torch.jit.script`, which torch deprecates with a FutureWarning when fastai is imported:
# a warning no ds2net user can act on. That one only (its category and message), so that no notebook shows it.
_warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
