"""Unlearning methods, found by name: ``get_method("cliperase")``. Importing this package registers them."""

from unlearning.methods.base import (  # noqa: F401
    METHODS,
    ForgetTarget,
    LabelledImages,
    Method,
    MethodConfig,
    MethodResult,
    UnlearningData,
    get_method,
    register,
    run_method,
    unmet_needs,
)
from unlearning.methods import baselines, cliperase, lipschitz, three_stage  # noqa: F401,E402  (register)
