"""The no-op registry: what counts as passing the stream through, with symbolic shapes compared without guards."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from mhc_rewrite.passes.noop import NOOPS, same_shape


def test_symbolic_shapes_are_equal_only_when_always_equal():
    env = ShapeEnv()
    with FakeTensorMode(shape_env=env) as mode:
        a = mode.from_tensor(torch.empty(3, 5), symbolic_context=None)
    s0, s1 = env.create_unbacked_symint(), env.create_unbacked_symint()
    with mode:
        x, y = torch.empty(s0, 8), torch.empty(s1, 8)
        assert same_shape(x, x.view(s0, 8))  # the same symbol: equal for every size
        assert not same_shape(x, y)  # two sizes that may differ: not a no-op
        assert not same_shape(x, torch.empty(s0, 8, 1))
    assert not env.guards  # deciding added no guard
    assert same_shape(a, torch.empty(3, 5)) and not same_shape(a, torch.empty(5, 3))


def test_registry_is_looked_up_by_op_and_target():
    assert NOOPS[("call_method", "clone")](None) is True
    assert ("call_function", torch.ops.aten.view.default) in NOOPS and ("call_function", torch.add) not in NOOPS
