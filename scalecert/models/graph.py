"""Any PyTorch classifier as a certifiable one: its own graph split into a stem f and a head g.

``GraphClassifier`` wraps a user's ``nn.Module`` (traced with ``torch.fx``) or an already
traced ``GraphModule`` (``torch.export``'s ``ExportedProgram.module()``). Nothing about the
architecture is written by hand:

- **The cut.** ``split(layer)`` cuts the graph after node ``layer``: the stem is that node and
  its ancestors, the head every other node, reading the layer's output in place of the stem.
  A cut where the head still reads another stem value (inside a residual block, or a skip from
  the input) is refused, naming the layer and what the head reads. Shape queries the head makes
  of stem values (``bs = x.size(0)``) are replaced by the same query on the head's input (the
  batch size) or by their value (the input size is fixed).
- **The footprints.** The stem's receptive fields are derived from its graph
  (:class:`GraphGeometry`): every stem operation is looked up in a closed table of sliding-window
  operations (convolution, pooling, constant padding, strided slicing; with their concrete
  kernel, stride, padding and dilation, recorded on a probe forward pass) and point-wise ones
  (activations, eval-mode batch norm, sums and products, channel concatenation). Anything else
  in the stem is refused, naming the node: global pooling, reshaping, resizing, attention,
  normalisation over space, an unknown function.
- **The checks when a layer is first used.** ``head(stem(x))`` must equal the model's logits on
  probe images (``torch.allclose`` with rtol = atol = 1e-5: the split runs the same operations,
  so in practice they are equal bit for bit), and NaN placed inside probe windows must reach no
  stem position outside the derived footprint (a wrong geometry would otherwise make unsound
  certificates).

The default layer is the first node whose output is spatial and non-negative by construction (a
ReLU, ReLU6, or a clamp at >= 0, or pooling/padding of such a value) where the cut is allowed.
``--layer`` names a node of the graph or the module path of a module called once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from scalecert.errors import InvalidOption
from scalecert.geometry import Footprints, Span, Window, conv_padding, geometry_of
from scalecert.models.base import Normalize, Split

TOLERANCE = 1e-5  # rtol and atol of the split's logits against the model's on probe images
_PROBE_SEED = 20211206

# point-wise operations, by the name of the function, method or ATen operator
_POINTWISE_OPS = frozenset({
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "clamp", "clamp_", "clamp_min",
    "clamp_min_", "clamp_max", "sigmoid", "sigmoid_", "tanh", "silu", "silu_", "hardswish",
    "hardswish_", "hardsigmoid", "gelu", "elu", "leaky_relu", "mish", "softplus", "selu",
    "add", "add_", "iadd", "sub", "sub_", "isub", "mul", "mul_", "imul", "truediv", "div",
    "div_", "neg", "abs", "pow", "sqrt", "rsqrt", "exp", "reciprocal",
    "batch_norm", "_native_batch_norm_legit_no_training", "dropout", "dropout_",
    "feature_dropout", "alpha_dropout", "clone", "contiguous", "to", "float", "type_as",
    "detach", "alias", "_to_copy",
})
# the same as modules (eval mode: batch norm uses its running statistics)
_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.GELU, nn.ELU, nn.LeakyReLU, nn.Mish, nn.Softplus, nn.SELU,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout, Normalize,
)
_RELU_OPS = frozenset({"relu", "relu_", "relu6"})
_CLAMP_OPS = frozenset({"hardtanh", "hardtanh_", "clamp", "clamp_", "clamp_min", "clamp_min_"})
# keep a non-negative input non-negative (data inputs only; constants are checked apart)
_PRESERVING_OPS = frozenset({
    "max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "dropout", "dropout_", "clone",
    "contiguous", "cat", "concat", "getitem", "slice", "add", "add_", "iadd", "alias",
    "detach", "_to_copy", "to", "float",
})
_SHAPE_OPS = frozenset({"size", "sym_size", "dim", "getattr", "numel", "sym_numel"})
# refused in a stem because their output reads the whole map (named in the message)
_UNBOUNDED_HINT = {
    "adaptive_avg_pool2d": "global pooling", "adaptive_max_pool2d": "global pooling",
    "mean": "a mean over the map", "sum": "a sum over the map", "amax": "a max over the map",
    "interpolate": "resizing", "upsample_bilinear2d": "resizing",
    "upsample_nearest2d": "resizing", "matmul": "a matrix product (attention)",
    "bmm": "a matrix product (attention)", "softmax": "a softmax",
    "scaled_dot_product_attention": "attention", "linear": "a linear layer",
    "flatten": "reshaping", "view": "reshaping", "reshape": "reshaping",
    "permute": "reshaping", "transpose": "reshaping", "group_norm": "normalisation over space",
    "layer_norm": "normalisation over space", "instance_norm": "normalisation over space",
}


@dataclass(frozen=True)
class NodeStep:
    """One stem node for :class:`GraphGeometry`: how its output positions read its inputs."""

    index: int
    window: Window | None  # None: point-wise (each output position reads the same position)
    inputs: tuple[int, ...]  # indices of the nodes whose spatial values it reads


@dataclass(frozen=True)
class GraphGeometry:
    """Receptive fields of a stem graph: spans walked back from the output to the input,
    through every path (the hull where paths meet, a superset of the exact field)."""

    steps: tuple[NodeStep, ...]  # topological order
    source: int  # the input's index
    output: int  # the layer's index

    def input_span(self, span: Span, axis: int) -> Span:
        spans: dict[int, Span] = {self.output: span}
        for step in reversed(self.steps):
            if step.index not in spans:
                continue
            reach = spans[step.index]
            if step.window is not None:
                reach = step.window.input_span(reach, axis)
            for source in step.inputs:
                known = spans.get(source)
                spans[source] = reach if known is None else (
                    min(known[0], reach[0]), max(known[1], reach[1]))
        return spans[self.source]


@dataclass(frozen=True)
class _Seen:
    """What a probe forward pass recorded of one node (at two batch sizes)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    value: Any  # the output at the first batch size (tensors kept for their shape and signs)
    other_value: Any  # the output at the second batch size (shape queries: batch-dependent?)


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps every node's concrete arguments and output."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.seen: dict[str, tuple[tuple, dict, Any]] = {}

    def run_node(self, node: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        value = super().run_node(node)
        self.seen[node.name] = (args, kwargs, value)
        return value


def op_name(node: fx.Node) -> str:
    """The name a node's operation is looked up by: the function's, method's or ATen
    operator's (``aten.relu.default`` -> ``relu``); the module's path for ``call_module``."""
    target = node.target
    if node.op in ("call_method", "call_module", "get_attr"):
        return str(target)
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    return getattr(target, "__name__", str(target))


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = [int(v) for v in value]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _conv_window(args: tuple, kwargs: dict) -> Window:
    """conv2d(input, weight, bias, stride, padding, dilation, groups) or ATen's convolution
    (..., transposed, output_padding, groups)."""
    weight = _arg(args, kwargs, 1, "weight", None)
    stride = _pair(_arg(args, kwargs, 3, "stride", 1))
    padding = _arg(args, kwargs, 4, "padding", 0)
    dilation = _pair(_arg(args, kwargs, 5, "dilation", 1))
    kernel = (int(weight.shape[-2]), int(weight.shape[-1]))
    return Window(kernel, stride, conv_padding(padding, kernel, dilation), dilation)


def _pool_window(args: tuple, kwargs: dict, dilated: bool) -> Window:
    """max_pool2d / avg_pool2d (input, kernel_size, stride, padding[, dilation])."""
    kernel = _pair(_arg(args, kwargs, 1, "kernel_size", None))
    stride = _arg(args, kwargs, 2, "stride", None)
    stride = kernel if stride is None or stride == [] or stride == () else _pair(stride)
    padding = _pair(_arg(args, kwargs, 3, "padding", 0))
    dilation = _pair(_arg(args, kwargs, 4, "dilation", 1)) if dilated else (1, 1)
    return Window(kernel, stride, padding, dilation)


_WINDOW_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.ZeroPad2d, nn.ConstantPad2d)


def _slice_window(index: Any, rank: int) -> Window | None:
    """``x[..., a::s, b::t]`` on a 4-D tensor as a window; None if it indexes otherwise."""
    items = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (rank - len(items) + 1) + items[at + 1:]
    items += [slice(None)] * (rank - len(items))
    if len(items) != rank or not all(isinstance(item, slice) for item in items):
        return None
    starts, steps = [], []
    for item in items[2:]:
        start, step = item.start or 0, item.step or 1
        if start < 0 or step < 1:
            return None
        starts.append(start)
        steps.append(step)
    if any(item != slice(None) for item in items[:1]):
        return None
    return Window((1, 1), (steps[0], steps[1]), (-starts[0], -starts[1]))


class GraphClassifier(nn.Module):
    """A user's classifier, certifiable: see the module docstring.

    ``forward(x) = module(normalize(x))`` for ``x`` in [0, 1]; ``state_dict`` and
    ``load_state_dict`` are the module's own (its checkpoints' key names)."""

    def __init__(
        self,
        module: nn.Module,
        *,
        name: str,
        input_size: int,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise InvalidOption(f"model {name}: expected an nn.Module, got {type(module).__name__}")
        if (mean is None) != (std is None):
            raise InvalidOption(f"model {name}: give both mean and std, or neither")
        self.name = name
        self.input_size = int(input_size)
        self.checkpoint_sha256: str | None = None
        self.normalize = (Normalize(tuple(mean), tuple(std)) if mean is not None
                          else nn.Identity())
        self.network = module
        self.train(False)
        self._graph = self._trace(module)
        self._seen = self._probe()
        out = self._seen[self._result_node().name].value
        if not (isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == 2
                and out.is_floating_point()):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InvalidOption(
                f"model {name}: its output on a batch of 2 images of {self.input_size} px is "
                f"{shape}; expected batch x classes logits (2 x C)")
        self.num_classes = int(out.shape[1])
        self._checked: set[str] = set()
        self._candidates: tuple[str, ...] | None = None

    # -- what the library uses of a classifier ---------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalize(x))

    def train(self, mode: bool = True) -> GraphClassifier:
        """As ``nn.Module.train``; an exported program stays as exported (eval mode) and
        cannot be put in training mode."""
        self.training = mode
        self.normalize.train(mode)
        try:
            self.network.train(mode)
        except NotImplementedError:
            if mode:
                raise InvalidOption(
                    f"model {self.name}: an exported program cannot be trained; fine-tune the "
                    "module it came from (file: or module:) and export it again") from None
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def superficial_layers(self) -> tuple[str, ...]:
        """Nodes where a cut is allowed, in graph order: spatial, non-negative, the head
        reading only them, and a stem whose receptive fields are bounded."""
        if self._candidates is None:
            self._candidates = tuple(node.name for node, refusal in self._cuts()
                                     if refusal is None)
        return self._candidates

    @property
    def default_layer(self) -> str:
        first_refusal: InvalidOption | None = None
        for node, refusal in self._cuts():  # the first allowed cut, without listing them all
            if refusal is None:
                return node.name
            first_refusal = first_refusal or refusal
        why = f"; the first candidate is refused: {first_refusal}" if first_refusal else ""
        raise InvalidOption(f"model {self.name}: no node is a spatial, non-negative output "
                            f"where the graph can be cut{why}")

    def _cuts(self) -> Iterator[tuple[fx.Node, InvalidOption | None]]:
        """Every spatial, non-negative node in graph order, with the refusal of a cut after
        it (None: allowed)."""
        for node in self._graph.nodes:
            if self._non_negative(node) and self._spatial(node):
                try:
                    self._plan_cut(node)
                except InvalidOption as exc:
                    yield node, exc
                else:
                    yield node, None

    def split(self, layer: str | None = None) -> Split:
        """Cut after ``layer`` (a node name, or a module path called once; default: the first
        allowed cut). The first split at a layer runs the probe checks."""
        node = self._graph_node(self.default_layer if layer is None else layer)
        if not (self._non_negative(node) and self._spatial(node)):
            raise InvalidOption(
                f"layer {node.name}: its output is not a spatial, non-negative map (a cut "
                "needs one after a ReLU-like activation); allowed here: "
                f"{', '.join(self.superficial_layers[:8]) or 'none'}")
        stem_nodes, geometry = self._plan_cut(node)
        stem = nn.Sequential(self.normalize, self._stem_module(stem_nodes, node))
        head = self._head_module(stem_nodes, node)
        split = Split(layer=node.name, stem=stem, head=head, geometry=geometry)
        if node.name not in self._checked:
            self._check_split(split)
            self._checked.add(node.name)
        return split

    # -- tracing and probing ---------------------------------------------------------------

    def _trace(self, module: nn.Module) -> fx.Graph:
        if isinstance(module, fx.GraphModule):
            return module.graph
        try:
            return fx.symbolic_trace(module).graph
        except Exception as exc:  # noqa: BLE001 - tracing fails in many ways on user code
            raise InvalidOption(
                f"model {self.name}: torch.fx cannot trace it ({type(exc).__name__}: {exc}); "
                "export it with torch.export (dynamic batch) and pass export:PATH.pt2"
            ) from exc

    def _graph_module(self, graph: fx.Graph) -> fx.GraphModule:
        return fx.GraphModule(self.network, graph)

    def _probe_images(self, count: int, seed: int = _PROBE_SEED) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(count, 3, self.input_size, self.input_size, generator=generator)

    def _device(self) -> torch.device:
        tensor = next(iter(self.network.parameters()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def _probe(self) -> dict[str, _Seen]:
        """Every node's concrete arguments and outputs on probe batches of 2 and 3 images."""
        runs = []
        for count in (2, 3):
            recorder = _Recorder(self._graph_module(self._graph))
            with torch.no_grad():
                try:
                    recorder.run(self.normalize(self._probe_images(count).to(self._device())))
                except Exception as exc:  # noqa: BLE001 - the user's model failed to run
                    raise InvalidOption(
                        f"model {self.name}: it fails on a batch of {count} images of "
                        f"{self.input_size} x {self.input_size} px ({type(exc).__name__}: "
                        f"{exc}); check --input-size") from exc
            runs.append(recorder.seen)
        first, second = runs
        return {name: _Seen(args, kwargs, value, second.get(name, (None, None, None))[2])
                for name, (args, kwargs, value) in first.items()}

    def _result_node(self) -> fx.Node:
        """The node whose value the model returns (an exported program returns a flat
        tuple of one)."""
        result = next(node for node in self._graph.nodes if node.op == "output").args[0]
        if isinstance(result, (tuple, list)) and len(result) == 1:
            result = result[0]
        if not isinstance(result, fx.Node):
            raise InvalidOption(f"model {self.name}: it returns {type(result).__name__} of "
                                "several values; expected one tensor of logits")
        return result

    def _graph_node(self, layer: str) -> fx.Node:
        nodes = {node.name: node for node in self._graph.nodes}
        if layer in nodes and nodes[layer].op not in ("placeholder", "output", "get_attr"):
            return nodes[layer]
        calls = [node for node in self._graph.nodes
                 if node.op == "call_module" and node.target == layer]
        if len(calls) == 1:
            return calls[0]
        if len(calls) > 1:
            raise InvalidOption(
                f"layer {layer}: module {layer} is called {len(calls)} times; name one of its "
                f"nodes: {', '.join(node.name for node in calls[:8])}")
        raise InvalidOption(
            f"layer {layer}: no such node or module in model {self.name}; allowed cuts: "
            f"{', '.join(self.superficial_layers[:8]) or 'none'}")

    # -- node properties -------------------------------------------------------------------

    def _value(self, node: fx.Node) -> Any:
        seen = self._seen.get(node.name)
        return None if seen is None else seen.value

    def _spatial(self, node: fx.Node) -> bool:
        """A batch of maps larger than one position (a 1 x 1 map is a pooled vector)."""
        value = self._value(node)
        return (isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[0] == 2
                and value.shape[2] * value.shape[3] > 1)

    def _data_inputs(self, node: fx.Node) -> list[fx.Node]:
        """The inputs of ``node`` that carry image-dependent tensors."""
        return [n for n in node.all_input_nodes
                if n.op != "get_attr" and isinstance(self._value(n), torch.Tensor)]

    def _non_negative(self, node: fx.Node) -> bool:
        """Non-negative by construction (not merely on the probe images)."""
        name = op_name(node)
        seen = self._seen.get(node.name)
        if node.op == "call_module":
            module = self.network.get_submodule(str(node.target))
            if isinstance(module, (nn.ReLU, nn.ReLU6)):
                return True
            if isinstance(module, nn.Hardtanh):
                return module.min_val >= 0
            if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity,
                                   nn.ZeroPad2d)):
                return all(self._non_negative(n) for n in self._data_inputs(node))
            return False
        if node.op not in ("call_function", "call_method") or seen is None:
            return False
        if name in _RELU_OPS:
            return True
        if name in _CLAMP_OPS:
            low = _arg(seen.args, seen.kwargs, 1, "min", None)
            if low is None:
                low = seen.kwargs.get("min_val", -1.0 if "hardtanh" in name else None)
            return isinstance(low, (int, float)) and low >= 0
        if name in ("pad", "constant_pad_nd"):
            value = _arg(seen.args, seen.kwargs, 3 if name == "pad" else 2, "value", 0.0) or 0.0
            return value >= 0 and all(self._non_negative(n) for n in self._data_inputs(node))
        if name in _PRESERVING_OPS:
            inputs = self._data_inputs(node)
            return bool(inputs) and all(self._non_negative(n) for n in inputs)
        return False

    # -- the cut -----------------------------------------------------------------------------

    def _plan_cut(self, layer: fx.Node) -> tuple[set[fx.Node], GraphGeometry]:
        """The stem's nodes and geometry for a cut after ``layer``; refuses a cut the head
        reads around and a stem with an unbounded operation."""
        stem: set[fx.Node] = set()
        pending = [layer]
        while pending:
            node = pending.pop()
            if node not in stem:
                stem.add(node)
                pending.extend(node.all_input_nodes)
        for node in self._graph.nodes:
            if node in stem or self._shape_value(node):  # shape queries: see _head_module
                continue
            for source in node.all_input_nodes:
                if source in stem and source is not layer and source.op != "get_attr" \
                        and not self._shape_value(source):
                    where = "the input image" if source.op == "placeholder" else source.name
                    raise InvalidOption(
                        f"layer {layer.name}: the head still reads {where} (at node "
                        f"{node.name}), not only the layer's output: the cut is inside a "
                        "residual block or skips it; choose a layer between blocks")
        return stem, self._geometry(stem, layer)

    def _shape_value(self, node: fx.Node) -> bool:
        """A shape query or arithmetic on shapes: no image values flow through it."""
        value = self._value(node)
        return node.op != "placeholder" and not isinstance(value, torch.Tensor) and not (
            isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value))

    def _geometry(self, stem: set[fx.Node], layer: fx.Node) -> GraphGeometry:
        order = [node for node in self._graph.nodes if node in stem]
        index = {node: i for i, node in enumerate(order)}
        steps = []
        source = None
        for node in order:
            if node.op == "placeholder":
                if source is not None:
                    raise InvalidOption(f"model {self.name}: more than one input")
                source = index[node]
                continue
            if node.op == "get_attr" or self._shape_value(node):
                continue
            window = self._window(node, layer)
            inputs = tuple(index[n] for n in self._data_inputs(node) if n in index)
            steps.append(NodeStep(index[node], window, inputs))
        if source is None:
            raise InvalidOption(f"layer {layer.name}: its value does not depend on the image")
        return GraphGeometry(tuple(steps), source, index[layer])

    def _window(self, node: fx.Node, layer: fx.Node) -> Window | None:
        """The node's sliding window, None if point-wise; refuses anything else."""
        name = op_name(node)
        seen = self._seen[node.name]
        args, kwargs = seen.args, seen.kwargs

        def refuse(what: str) -> InvalidOption:
            return InvalidOption(
                f"layer {layer.name}: the stem contains {node.name} ({what}), whose receptive "
                "field has no bound that footprints can be derived from; choose an earlier "
                "layer")

        if node.op == "call_module":
            module = self.network.get_submodule(str(node.target))
            if isinstance(module, _WINDOW_MODULES):
                return geometry_of(module)  # type: ignore[return-value]
            if isinstance(module, _POINTWISE_MODULES):  # batch norm: as certified, in eval mode
                return None
            raise refuse(f"module {type(module).__name__}")
        if name in ("conv2d", "convolution", "_convolution"):
            if name != "conv2d" and _arg(args, kwargs, 6, "transposed", False):
                raise refuse("a transposed convolution")
            return _conv_window(args, kwargs)
        if name in ("max_pool2d", "max_pool2d_with_indices", "_max_pool2d"):
            return _pool_window(args, kwargs, dilated=True)
        if name == "avg_pool2d":
            return _pool_window(args, kwargs, dilated=False)
        if name in ("pad", "constant_pad_nd"):
            pads = list(_arg(args, kwargs, 1, "pad", ()))
            mode = _arg(args, kwargs, 2, "mode", "constant") if name == "pad" else "constant"
            if mode != "constant":
                raise refuse(f"{mode} padding")
            pads += [0] * (4 - len(pads))
            return Window((1, 1), (1, 1), (int(pads[2]), int(pads[0])))
        if name == "getitem":
            value = args[0]
            if not isinstance(value, torch.Tensor):
                return None  # an element of a tuple output (values of max_pool2d_with_indices)
            window = _slice_window(args[1], value.ndim) if value.ndim == 4 else None
            if window is None:
                raise refuse(f"indexing {args[1]!r}")
            return window
        if name == "slice":
            dim, start = _arg(args, kwargs, 1, "dim", 0), _arg(args, kwargs, 2, "start", None)
            step = _arg(args, kwargs, 4, "step", 1)
            if dim in (0, 1, -4, -3):
                return None
            if (start or 0) < 0:
                raise refuse("a slice from the end")
            axis = dim % 4 - 2
            stride, padding = [1, 1], [0, 0]
            stride[axis], padding[axis] = int(step), -int(start or 0)
            return Window((1, 1), (stride[0], stride[1]), (padding[0], padding[1]))
        if name in ("cat", "concat"):
            dim = _arg(args, kwargs, 1, "dim", 0)
            if dim % 4 != 1:
                raise refuse(f"concatenation along dimension {dim}")
            return None
        if name == "batch_norm" and _arg(args, kwargs, 5, "training", False):
            raise refuse("batch norm with batch statistics")
        if name in _POINTWISE_OPS:
            for source in self._data_inputs(node):
                value = self._value(source)
                out = self._value(node)
                if isinstance(out, torch.Tensor) and value.ndim == 4 and \
                        tuple(value.shape[2:]) != tuple(out.shape[2:]):
                    raise refuse(f"{name} of maps of sizes {tuple(value.shape[2:])} and "
                                 f"{tuple(out.shape[2:])}")
            return None
        raise refuse(_UNBOUNDED_HINT.get(name, f"operation {name}"))

    def _stem_module(self, stem: set[fx.Node], layer: fx.Node) -> fx.GraphModule:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in self._graph.nodes:
            if node in stem:
                env[node] = graph.node_copy(node, lambda n: env[n])
        graph.output(env[layer])
        return self._graph_module(graph)

    def _head_module(self, stem: set[fx.Node], layer: fx.Node) -> fx.GraphModule:
        graph = fx.Graph()
        features = graph.placeholder("features")
        env: dict[fx.Node, fx.Node] = {layer: features}

        def lookup(node: fx.Node) -> fx.Node:
            if node not in env:  # a stem value the head may read: a parameter or a shape
                env[node] = self._head_copy_of(graph, node, features)
            return env[node]

        for node in self._graph.nodes:
            if node in stem:
                continue
            if node.op == "output":  # the logits themselves, not an exported flat tuple
                graph.output(env[self._result_node()])
            elif self._shape_value(node) and not node.users:
                continue  # a check on the input's shape (an exported program's guards)
            elif self._shape_value(node) and any(
                    source in stem and source is not layer for source in node.all_input_nodes):
                env[node] = self._head_copy_of(graph, node, features)  # bs = x.size(0)
            else:
                env[node] = graph.node_copy(node, lookup)
        return self._graph_module(graph)

    def _head_copy_of(self, graph: fx.Graph, node: fx.Node, features: fx.Node) -> fx.Node:
        if node.op == "get_attr":
            return graph.get_attr(str(node.target))
        seen = self._seen[node.name]
        if seen.value == 2 and seen.other_value == 3:  # the batch size
            return graph.call_method("size", (features, 0))
        if seen.value == seen.other_value and isinstance(seen.value, (int, float, tuple)):
            return seen.value  # a shape fixed by the input size
        raise InvalidOption(f"model {self.name}: the head reads {node.name}, a value of the "
                            "stem that depends on the batch in a way the split cannot follow")

    # -- checks when a layer is first used -------------------------------------------------

    def _check_split(self, split: Split) -> None:
        """The probes, in eval mode (as certification runs; fine-tuning splits in train mode)."""
        training = self.training
        self.train(False)
        try:
            self._check_split_in_eval_mode(split)
        finally:
            self.train(training)

    def _check_split_in_eval_mode(self, split: Split) -> None:
        images = self._probe_images(2, seed=_PROBE_SEED + 1).to(self._device())
        with torch.no_grad():
            features = split.stem(images)
            logits = split.head(features)
            expected = self(images)
        if not torch.allclose(logits, expected, rtol=TOLERANCE, atol=TOLERANCE):
            gap = (logits - expected).abs().max().item()
            raise InvalidOption(
                f"layer {split.layer}: head(stem(x)) differs from the model's logits by up to "
                f"{gap:.3g} on probe images (tolerance {TOLERANCE:g}): the graph split does "
                "not compute the model")
        if bool((features < 0).any()):
            raise InvalidOption(f"layer {split.layer}: negative features on probe images")
        self._check_footprints(split, tuple(features.shape[2:]))

    def _check_footprints(self, split: Split, feature_hw: tuple[int, int]) -> None:
        """NaN inside a window must reach only the window's derived footprint."""
        n = self.input_size
        side = max(1, n // 8)
        boxes = [(0, 0, side, side), (n // 2 - side // 2, n // 3, n // 2 + (side + 1) // 2,
                                      n // 3 + side), (n - side, n - 1, n, n),
                 (n // 5, n - side, n // 5 + 1, n)]
        footprints = Footprints(split.geometry, feature_hw)(torch.tensor(boxes))
        images = self._probe_images(len(boxes), seed=_PROBE_SEED + 2).to(self._device())
        for i, (top, left, bottom, right) in enumerate(boxes):
            images[i, :, top:bottom, left:right] = math.nan
        with torch.no_grad():
            reached = split.stem(images).isnan().any(dim=1).flatten(1).cpu()
        escaped = reached & ~footprints
        if bool(escaped.any()):
            i = int(escaped.any(dim=1).nonzero()[0])
            raise InvalidOption(
                f"layer {split.layer}: a window {boxes[i]} reaches {int(escaped[i].sum())} stem "
                "positions outside its derived footprint: the stem has an operation whose "
                "receptive field the graph does not show; choose an earlier layer")

