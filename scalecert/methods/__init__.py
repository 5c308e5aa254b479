"""The certification methods: one module each, one registry (:mod:`scalecert.methods.registry`).

A method module holds what is particular to that defense: the predictor F(x, m) the
certification stage drives (``predictor``) and the forward pass its fine-tuning trains
(``defended_logits``). Its registry entry says which guarantee its certificate rows carry
(``detection``: certified images are labelled right or ALERT under any patch). Adding a method is
a module here plus one entry in the registry.
"""

from scalecert.methods.registry import (
    MethodInfo,
    available_methods,
    describe_methods,
    load_method,
    method_info,
)

__all__ = ["MethodInfo", "available_methods", "describe_methods", "load_method", "method_info"]
