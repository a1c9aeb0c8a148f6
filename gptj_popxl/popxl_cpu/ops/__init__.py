"""popxl.ops: every op is a primitive with its shape rule, kernel and gradient rule side by side."""
from . import collectives, var_updates
from .control import CallSiteInfo, call, call_with_info, repeat, repeat_with_info
from .elementwise import (abs, add, add_, cast, ceil, cos, detach, detach_, div, equal, exp, exp_, floor, fmod, gelu,
                          gelu_, geluerf, geluerf_, greater, identity, isfinite, isinf, isnan, log, log2, logical_and,
                          logical_not, logical_or, maximum, mul, negate, pow, relu, relu_, sign, sin, sqrt, sub, swish,
                          swish_, tanh)
from .io import host_load, host_store, init, remote_load, remote_load_, remote_store
from .nn import matmul, softmax
from .reduce import argmax, argmin, l1, l2, logsum, logsumexp, max, mean, min, prod, sum, sumsquare
from .shape import (concat, concat_, flatten, flatten_, index, reshape, reshape_, slice, slice_, split, squeeze,
                    transpose, transpose_)
from .code_copy import *  # noqa: F401,F403 - each module lists its public ops in __all__
from .dynamic import *  # noqa: F401,F403
from .gather import *  # noqa: F401,F403
from .loss import *  # noqa: F401,F403
from .misc import *  # noqa: F401,F403
from .norm import *  # noqa: F401,F403
from .random import *  # noqa: F401,F403
from .where import *  # noqa: F401,F403
