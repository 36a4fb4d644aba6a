"""models/fusion.fuse_linears: one fused matrix whose rows are the layers' own weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blip3o_engine.models.fusion import fuse_linears, is_live


def _layers(bias: bool, seed: int = 0) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(13, 7, bias=bias), nn.Linear(13, 3, bias=bias), nn.Linear(13, 5, bias=bias)]


@pytest.mark.parametrize("in_major", [False, True], ids=["row_major", "in_major"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_fused_gemm_and_layers_keep_their_outputs(in_major, bias):
    """Every layer still gives its own output, and the fused GEMM gives them side by side. A row-major
    layer moves no value and keeps its layout: bit-identical. In-major storage, and the fused GEMM's
    wider output, make BLAS pick another blocking (summation order): within 4 fp32 ulps of the output."""
    layers = _layers(bias)
    x = torch.randn(4, 13)
    before = [lin(x) for lin in layers]
    weight, fused_bias = fuse_linears(layers, in_major=in_major)
    assert weight.shape == (15, 13) and (fused_bias is None) == (not bias)
    after = [lin(x) for lin in layers]
    together = F.linear(x, weight, fused_bias).split([7, 3, 5], dim=-1)
    ulps = 4 * torch.finfo(torch.float32).eps * max(b.abs().max().item() for b in before)
    for b, a, t in zip(before, after, together):
        torch.testing.assert_close(a, b, rtol=0, atol=ulps if in_major else 0)
        torch.testing.assert_close(t, b, rtol=0, atol=ulps)


@pytest.mark.parametrize("in_major", [False, True], ids=["row_major", "in_major"])
def test_layers_become_views_of_one_storage(in_major):
    """No second copy: each layer's weight and bias live inside the fused tensors' storage."""
    layers = _layers(bias=True)
    weight, bias = fuse_linears(layers, in_major=in_major)
    for lin in layers:
        assert lin.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
        assert lin.bias.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()
        assert not lin.weight.requires_grad
    if in_major:
        assert weight.t().is_contiguous()  # [in, sum(out)] storage, what CPU BLAS streams fastest
    else:
        assert weight.is_contiguous()


def test_second_call_reuses_the_fusion():
    layers = _layers(bias=True)
    first = fuse_linears(layers)
    again = fuse_linears(layers)
    assert again[0] is first[0] and again[1] is first[1]
    other = fuse_linears(layers[:2])  # a different group is a new fusion (of the current views)
    assert other[0] is not first[0] and other[0].shape == (10, 13)


def test_mismatched_layers_are_refused():
    with pytest.raises(ValueError, match="in_features"):
        fuse_linears([nn.Linear(4, 2), nn.Linear(5, 2)])
    with pytest.raises(ValueError, match="bias"):
        fuse_linears([nn.Linear(4, 2), nn.Linear(4, 2, bias=False)])
    with pytest.raises(ValueError, match="at least one"):
        fuse_linears([])


class _FusedPair(nn.Module):
    """The models' pattern: the fused GEMM while the fusion is live, the layers' own weights otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _layers(bias=True)[:2]
        self.fused = fuse_linears([self.a, self.b])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_live(self.fused[0], self.a):
            return F.linear(x, *self.fused)
        return torch.cat([self.a(x), self.b(x)], dim=-1)


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_a_fused_module_exports_with_the_layers_weights(strict):
    """Under torch.export the fusion is not live (fake tensors have no pointer, and the fused matrix, a plain
    attribute, would be baked in as a constant copy): the program takes the layers' parameters as inputs, and
    its output is the eager module's (the fused and the per-layer GEMMs differ by BLAS blocking: 4 ulps)."""
    module = _FusedPair().eval()
    assert is_live(module.fused[0], module.a)  # eager: the fused path
    x = torch.randn(5, 13)
    program = torch.export.export(module, (x,), strict=strict)
    assert {"a.weight", "b.weight"} <= set(program.state_dict) and not program.constants
    want = module(x)
    torch.testing.assert_close(program.module()(x), want, rtol=0,
                               atol=4 * torch.finfo(torch.float32).eps * want.abs().max().item())
