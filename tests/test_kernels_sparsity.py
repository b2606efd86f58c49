"""N:M sparsity: masks valid by construction, saliencies that pick the right weights, a Hutchinson estimate that
matches exact Hessian diagonals, calibration hooks that clean up, and the backend choice with its reasons."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsnas.errors import TrialError
from dsnas.kernels import sparsity as sp

PATTERNS = [(1, 4), (2, 4), (4, 8)]


def _assert_valid_nm(scores: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> None:
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    sp.check_nm(mask, n, m)
    groups, kept = scores.reshape(-1, m).double(), mask.reshape(-1, m)
    # every kept score is at least every dropped one in its group, and ties go to the earlier position
    low_kept = groups.masked_fill(~kept, float("inf")).min(-1).values
    high_dropped = groups.masked_fill(kept, float("-inf")).max(-1).values
    assert (low_kept >= high_dropped).all()
    for g, k in zip(groups.tolist(), kept.tolist(), strict=True):
        cut = min(v for v, keep in zip(g, k, strict=True) if keep)
        tied = [i for i, v in enumerate(g) if v == cut]
        assert [k[i] for i in tied] == sorted((k[i] for i in tied), reverse=True)


@pytest.mark.parametrize("n, m", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_nm_mask_is_valid_by_construction(n: int, m: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(n * 10 + m)
    for case in range(25):
        shape = (int(torch.randint(1, 6, (), generator=gen)), m * int(torch.randint(1, 7, (), generator=gen)))
        if case % 2:  # few distinct values, negatives included: many ties
            scores = torch.randint(-2, 3, shape, generator=gen).to(dtype)
        else:
            scores = (torch.randn(shape, generator=gen) * 10).to(dtype)
        mask = sp.nm_mask(scores, n, m)
        _assert_valid_nm(scores, mask, n, m)
        assert torch.equal(mask, sp.nm_mask(scores.clone(), n, m))


def test_nm_mask_on_more_dims_and_exact_ties():
    assert sp.nm_mask(torch.zeros(1, 8), 2, 4).tolist() == [[True, True, False, False] * 2]
    scores = torch.tensor([[[-1.0, -3.0, -1.0, -1.0]]])
    assert sp.nm_mask(scores, 2, 4).tolist() == [[[True, False, True, False]]]


@pytest.mark.parametrize("shape, n, m, match", [
    ((4, 30), 2, 4, r"multiple of m=4, but got the scores of shape \(4, 30\)"),
    ((4, 8), 0, 4, "0 < n <= m"),
    ((4, 8), 5, 4, "0 < n <= m"),
])
def test_nm_mask_refuses_bad_shapes_and_patterns(shape, n, m, match):
    with pytest.raises(TrialError, match=match):
        sp.nm_mask(torch.randn(shape), n, m)


def test_nm_mask_refuses_nan_scores():
    scores = torch.randn(2, 8)
    scores[1, 3] = float("nan")
    with pytest.raises(TrialError, match="1 of 16"):
        sp.nm_mask(scores)


def test_check_nm_names_the_first_bad_group():
    mask = sp.nm_mask(torch.randn(3, 8))
    mask[2, 5] = ~mask[2, 5]
    with pytest.raises(TrialError, match=r"1 group\(s\) do not \(first: group \(2, 1\) keeps [13]\)"):
        sp.check_nm(mask)
    with pytest.raises(TrialError, match="multiple of m=4"):
        sp.check_nm(torch.ones(2, 6, dtype=torch.bool))


def test_magnitude_keeps_the_largest_absolute_values():
    w = torch.tensor([[-5.0, 1.0, 0.5, 4.0], [0.1, -0.2, 0.3, -0.4]])
    assert sp.nm_mask(sp.magnitude_scores(w)).tolist() == [[True, False, False, True], [False, False, True, True]]
    assert torch.equal(sp.saliency("magnitude", w), w.abs())


def test_wanda_weighs_each_weight_by_its_input_norm():
    w = torch.tensor([[4.0, 1.0, -3.0, 2.0]])
    norms = torch.tensor([0.1, 10.0, 1.0, 1.0])
    scores = sp.wanda_scores(w, norms)
    assert torch.allclose(scores, torch.tensor([[0.4, 10.0, 3.0, 2.0]]))
    assert sp.nm_mask(scores).tolist() == [[False, True, True, False]]  # magnitude alone would keep 0 and 2
    assert torch.equal(sp.saliency("wanda", w, input_norm=norms), scores)
    with pytest.raises(TrialError, match=r"shape \(4,\), but got \(3,\)"):
        sp.wanda_scores(w, norms[:3])


def test_hessian_saliency_is_curvature_times_squared_weight():
    w = torch.tensor([[1.0, 1.0, -2.0, 2.0]])
    h = torch.tensor([[10.0, 1.0, 0.1, 1.0]])
    scores = sp.hessian_scores(w, h)
    assert torch.allclose(scores, torch.tensor([[10.0, 1.0, 0.4, 4.0]]))
    assert sp.nm_mask(scores).tolist() == [[True, False, False, True]]
    assert torch.equal(sp.saliency("hessian", w, hessian_diag=h), scores)
    with pytest.raises(TrialError, match="weight's shape"):
        sp.hessian_scores(w, h.t())


def test_saliency_refuses_unknown_methods_and_missing_inputs():
    w = torch.randn(2, 4)
    with pytest.raises(TrialError, match=r"one of \('magnitude', 'hessian', 'wanda'\), but got 'snip'"):
        sp.saliency("snip", w)
    with pytest.raises(TrialError, match="'wanda' needs input_norm"):
        sp.saliency("wanda", w)
    with pytest.raises(TrialError, match="'hessian' needs hessian_diag"):
        sp.saliency("hessian", w)


def _hutchinson_std(hessian: torch.Tensor, samples: int) -> torch.Tensor:
    """The standard deviation of the estimate of each diagonal entry: sqrt(sum_{j != i} H_ij^2 / samples)."""
    off = hessian - torch.diag(hessian.diagonal())
    return (off.pow(2).sum(1) / samples).sqrt()


def test_hutchinson_matches_the_diagonal_of_a_quadratic():
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    a = b @ b.t() / 6 + torch.eye(6, dtype=torch.float64)
    w1 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def loss() -> torch.Tensor:
        z = torch.cat([w1.reshape(-1), w2])
        return 0.5 * z @ a @ z

    samples = 2000
    est = sp.hutchinson_diag(loss, [w1, w2], samples=samples, seed=1)
    assert [e.shape for e in est] == [w1.shape, w2.shape] and est[0].dtype == torch.float32
    got = torch.cat([est[0].reshape(-1), est[1]]).double()
    assert (got - a.diagonal()).abs().le(5 * _hutchinson_std(a, samples) + 1e-6).all()
    again = sp.hutchinson_diag(loss, [w1, w2], samples=samples, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(est, again, strict=True))
    other = sp.hutchinson_diag(loss, [w1, w2], samples=samples, seed=2)
    assert not torch.equal(est[0], other[0])
    assert sp.hessian_traces(est) == pytest.approx([float(est[0].sum()), float(est[1].sum())])


def test_hutchinson_matches_the_exact_hessian_of_a_linear_layer():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)

    def loss_of(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(F.linear(x, weight, bias)) - y).pow(2).mean()

    blocks = torch.autograd.functional.hessian(loss_of, (layer.weight.detach(), layer.bias.detach()))
    sizes = [layer.weight.numel(), layer.bias.numel()]
    full = torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(2)], 1) for i in range(2)])
    samples = 1500
    est = sp.hutchinson_diag(lambda: loss_of(layer.weight, layer.bias), [layer.weight, layer.bias], samples, seed=0)
    got = torch.cat([e.reshape(-1) for e in est]).double()
    assert (got - full.diagonal()).abs().le(5 * _hutchinson_std(full, samples) + 1e-6).all()


def test_hutchinson_gives_zero_where_the_loss_has_no_curvature():
    w, unused = torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)
    est = sp.hutchinson_diag(lambda: (2 * w).sum(), [w, unused], samples=3, seed=0)
    assert all(torch.equal(e, torch.zeros_like(e)) for e in est)
    with pytest.raises(TrialError, match="samples >= 1"):
        sp.hutchinson_diag(lambda: w.sum(), [w], samples=0, seed=0)
    with pytest.raises(TrialError, match="require grad"):
        sp.hutchinson_diag(lambda: w.sum(), [torch.zeros(2)], samples=1, seed=0)


def test_layers_rank_by_curvature_per_weight_not_by_size():
    names = ["big", "small", "mid"]
    # raw traces would put "small" first; per weight it is the most sensitive
    assert sp.rank_layers_by_sensitivity(names, [100.0, 10.0, 30.0], [1000, 10, 100]) == ["big", "mid", "small"]
    assert sp.rank_layers_by_sensitivity(["a", "b"], [1.0, 2.0], [1, 2]) == ["a", "b"]  # ties keep the order
    with pytest.raises(TrialError, match="aligned"):
        sp.rank_layers_by_sensitivity(names, [1.0], [1, 1, 1])
    with pytest.raises(TrialError, match="at least one weight"):
        sp.rank_layers_by_sensitivity(["a"], [1.0], [0])


def _tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_input_norms_match_a_direct_computation_and_hooks_are_removed():
    model = _tiny_model()
    batches = [torch.randn(2, 5, 4) for _ in range(3)]
    layers = {"0": model[0], "2": model[2]}
    norms = sp.collect_input_norms(model, layers, batches)
    first = torch.cat([b.reshape(-1, 4) for b in batches])
    second = torch.relu(model[0](first)).detach()
    assert torch.allclose(norms["0"], first.norm(dim=0))
    assert torch.allclose(norms["2"], second.norm(dim=0), atol=1e-6)
    assert not model[0]._forward_hooks and not model[2]._forward_hooks


def test_input_norm_hooks_are_removed_on_error_and_silent_layers_refused():
    model = _tiny_model()

    def batches():
        yield torch.randn(2, 4)
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        sp.collect_input_norms(model, {"0": model[0]}, batches())
    assert not model[0]._forward_hooks
    with pytest.raises(TrialError, match=r"\['extra'\] saw none"):
        sp.collect_input_norms(model[:2], {"0": model[0], "extra": model[2]}, [torch.randn(2, 4)])
    assert not model[2]._forward_hooks


def test_sparsify_layer_zeros_exactly_the_dropped_weights_and_keeps_the_mask():
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    before = layer.weight.detach().clone()
    mask = sp.sparsify_layer(layer, sp.magnitude_scores(layer.weight))
    assert torch.equal(layer.weight[mask], before[mask]) and not layer.weight[~mask].any()
    assert torch.equal(layer.mask, mask) and "mask" in layer.state_dict()
    assert sp.sparsity_of(layer.weight) == 0.5
    # a second pass (4:8 now) replaces the buffer, and so does a layer whose mask was a plain None attribute
    assert sp.sparsify_layer(layer, torch.randn(3, 8), 4, 8) is layer.mask
    dense = nn.Linear(8, 2)
    dense.mask = None
    sp.sparsify_layer(dense, torch.randn(2, 8), 1, 4)
    assert "mask" in dict(dense.named_buffers()) and sp.sparsity_of(dense.weight) == 0.75
    with pytest.raises(TrialError, match="weight's shape"):
        sp.sparsify_layer(layer, torch.randn(8, 3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_backend_on_a_machine_without_cuda_is_masked_dense_and_says_why():
    assert sp.sparse_backend((128, 256), torch.float16, "cpu") == ("masked-dense", "no CUDA device")
    w = torch.randn(4, 8)
    mask = sp.nm_mask(w.abs())
    dense, backend, reason = sp.to_semi_structured(w, mask, torch.bfloat16)
    assert (backend, reason) == ("masked-dense", "no CUDA device")
    assert dense.dtype == torch.bfloat16 and torch.equal(dense, (w * mask).bfloat16())
    four_of_eight = sp.nm_mask(torch.tensor([[1.0] * 4 + [0.0] * 4] * 4), 4, 8)
    _, backend, reason = sp.to_semi_structured(w, four_of_eight, torch.float16)
    assert (backend, reason) == ("masked-dense", "the mask keeps 4 of some 4 consecutive weights; semi-structured "
                                                 "kernels take 2:4")


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch):
    """A CUDA device whose compute capability and cuSPARSELt a test sets; nothing runs on it."""
    state = {"capability": (9, 0), "cusparselt": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["capability"])
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: state["cusparselt"])
    return state


@pytest.mark.parametrize("capability, cusparselt, shape, dtype, want", [
    ((9, 0), True, (128, 256), torch.bfloat16, ("cusparselt", "")),
    ((8, 0), True, (48, 16), torch.float16, ("cusparselt", "")),
    ((8, 6), False, (128, 256), torch.float16, ("cutlass", "")),
    ((8, 0), False, (16, 128), torch.int8, ("cutlass", "")),
    ((8, 0), True, (16, 128), torch.int8, ("cutlass", "")),  # too few rows for cuSPARSELt's int8 (32, 32)
    ((9, 0), True, (128, 256), torch.float32,
     ("masked-dense", "dtype float32 has no semi-structured kernel (float16, bfloat16, int8 do)")),
    ((8, 0), False, (30, 64), torch.float16,
     ("masked-dense", "cusparselt: this torch build ({v}) has no cuSPARSELt; cutlass: shape (30, 64) is not a "
                      "multiple of (32, 64)")),
    ((9, 0), True, (24, 64), torch.float16,
     ("masked-dense", "cusparselt: shape (24, 64) is not a multiple of (16, 16); cutlass: CUTLASS sparse kernels run "
                      "on compute capability 8.x only, got 9.0")),
    ((7, 5), True, (128, 256), torch.float16,
     ("masked-dense", "cusparselt: compute capability 7.5 < 8.0 has no sparse tensor cores; cutlass: CUTLASS sparse "
                      "kernels run on compute capability 8.x only, got 7.5")),
    ((9, 0), True, (2, 128, 256), torch.float16,
     ("masked-dense", "semi-structured kernels take a 2-D weight, got shape (2, 128, 256)")),
])
def test_backend_choice_and_reasons_on_a_faked_gpu(fake_cuda, capability, cusparselt, shape, dtype, want):
    fake_cuda.update(capability=capability, cusparselt=cusparselt)
    backend, reason = sp.sparse_backend(shape, dtype, torch.device("cuda", 0))
    assert (backend, reason) == (want[0], want[1].format(v=torch.__version__))


def test_backend_for_a_cpu_weight_on_a_gpu_machine(fake_cuda):
    assert sp.sparse_backend((128, 256), torch.float16, "cpu") == ("masked-dense",
                                                                  "the weight is on cpu, not a CUDA device")


def test_importing_sparsity_starts_no_cuda():
    code = "import torch, dsnas.kernels.sparsity; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(128, 256), (256, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_semi_structured_matches_masked_dense_on_cuda(shape, dtype, record_property):
    torch.manual_seed(0)
    w = torch.randn(shape, device="cuda")
    mask = sp.nm_mask(sp.magnitude_scores(w))
    expect = sp.sparse_backend(shape, dtype, w.device)
    sparse, backend, reason = sp.to_semi_structured(w, mask, dtype)
    record_property("backend", backend)
    print(f"{torch.cuda.get_device_name()} {shape} {dtype}: {backend} {reason}")
    assert (backend, reason) == expect
    if backend == "masked-dense":
        pytest.skip(f"no semi-structured kernel here: {reason}")
    assert isinstance(sparse, torch.sparse.SparseSemiStructuredTensor)
    x = torch.randn(64, shape[1], device="cuda", dtype=dtype)
    dense = (w * mask).to(dtype)
    got, want = F.linear(x, sparse).float(), F.linear(x, dense).float()
    assert float((got - want).abs().max() / want.abs().max()) < 2e-2  # about one ulp of the output, not a wrong packing
    assert sp.sparsity_of(sparse) >= 0.5
