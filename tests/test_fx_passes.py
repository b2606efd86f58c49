"""Graph substitution passes (benchmarks/fx_passes.py): each pass on hand-written modules (what it rewrites, what it must leave alone, outputs
bit-identical on shapes where a literal-shape rewrite would go wrong) and the transformer family end to end."""

from __future__ import annotations

import operator
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from dsnas.errors import TrialError
from dsnas.models.transformer_lm import build

# The passes live beside their benchmark (benchmarks/fx_passes.py): no candidate runs them (see the README).
BENCHMARKS = str(Path(__file__).resolve().parent.parent / "benchmarks")
sys.path.insert(0, BENCHMARKS)
try:
    from fx_passes import (
        Pass,
        PermuteChains,
        RedundantContiguous,
        ReshapeToPermute,
        ViewChains,
        mutation_free,
        optimize,
        run_passes,
        trace,
    )
finally:
    sys.path.remove(BENCHMARKS)

ARCH = {"family": "transformer_lm", "vocab_size": 256, "context": 64, "d_model": 64,
        "layers": [{"n_heads": 2, "ffn_ratio": 4}, {"n_heads": 4, "ffn_ratio": 2}]}
SHAPE_OPS = {"view", "reshape", "flatten", "unflatten", "transpose", "permute", "contiguous"}


def shape_ops(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_method" and n.target in SHAPE_OPS]


def check(model: nn.Module, shapes: list[tuple[int, ...]], example: tuple[int, ...] | None = None, device="cpu"):
    """Optimize on one example, then compare with the eager model on every shape: same values, same shape."""
    torch.manual_seed(0)
    model = model.eval()
    out = optimize(model, (torch.randn(example or shapes[0], device=device),))
    for shape in shapes:
        x = torch.randn(shape, device=device)
        want, got = model(x.clone()), out.module(x.clone())
        want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
        assert len(want) == len(got)
        for w, g in zip(want, got):
            assert w.shape == g.shape and torch.equal(w, g), shape
    return out


def delta(out) -> int:
    meta = out.module.meta["dsnas.passes"]
    return meta["nodes_before"] - meta["nodes_after"]


# ---- (1) view chains --------------------------------------------------------------------------------------------


class ViewChain(nn.Module):
    def forward(self, x):  # (b, c, h, w)
        b = x.shape[0]
        y = x.view(b, -1).view(b, x.shape[1], -1).flatten(1)  # three views -> reshape(x, b, -1)
        z = x.flatten(1).unflatten(1, (x.shape[1], -1))  # flatten first: the merged shape uses x.size(0)
        return y * 2, z + 1


class SharedIntermediate(nn.Module):
    def forward(self, x):  # (b, n) with n even
        y = x.view(x.shape[0], -1, 2)
        return y.view(x.shape[0], -1) * 2, y + 1  # y has two users: merging would compute it twice


class DtypeView(nn.Module):
    def forward(self, x):
        return x.view(torch.int32).view(-1)  # reinterprets bytes: not a shape op


def test_view_chain_merges_into_one_reshape_for_any_batch():
    out = check(ViewChain(), [(3, 2, 4, 5), (1, 2, 4, 5), (2, 4, 4, 4)])
    assert out.counts["view_chains"] == 2
    assert shape_ops(out.module) == ["reshape", "reshape"]
    # Five view ops and a size only they used became two reshapes and one x.size(0).
    assert delta(out) == 6 - 2


def test_view_chain_with_a_shared_intermediate_is_left_alone():
    out = check(SharedIntermediate(), [(3, 8), (1, 4), (2, 2)])
    assert out.counts["view_chains"] == 0 and delta(out) == 0


def test_dtype_view_is_not_a_shape_op():
    out = check(DtypeView(), [(2, 3)])
    assert out.counts["view_chains"] == 0 and shape_ops(out.module) == ["view", "view"]


# ---- (2) permute chains -----------------------------------------------------------------------------------------


class PermuteChain(nn.Module):
    def forward(self, x):  # (a, b, c, d)
        y = x.transpose(1, 2).permute(0, 3, 1, 2).transpose(-1, -2)  # one permute
        z = x.transpose(1, 2).transpose(2, 1)  # inverse pair: x
        w = x.permute(0, 2, 3, 1).permute(0, 3, 1, 2)  # inverse pair: x
        s = x.swapaxes(0, 3).transpose(0, 3)  # inverse pair: x
        return y, z + 1, w * 2, s - 1


class SharedTranspose(nn.Module):
    def forward(self, x):
        y = x.transpose(0, 1)
        return y.transpose(1, 2), y * 2  # y has another user: no saving, no rewrite


def test_permute_chain_composes_and_drops_inverse_pairs():
    # (3, 3, 3, 3): every wrong permutation still runs, and only torch.equal can tell.
    out = check(PermuteChain(), [(2, 3, 4, 5), (3, 3, 3, 3), (1, 2, 1, 3), (5, 4, 3, 2)])
    assert out.counts["permute_chains"] == 4
    assert shape_ops(out.module) == ["permute"]
    assert delta(out) == 9 - 1


def test_permute_chain_with_a_shared_intermediate_is_left_alone():
    out = check(SharedTranspose(), [(2, 3, 4), (3, 3, 3)])
    assert out.counts["permute_chains"] == 0 and delta(out) == 0


def test_permute_chain_without_a_known_rank_is_kept_and_says_why():
    gm = trace(nn.Sequential(Transposes()))
    counts = run_passes(gm, [PermuteChains()])  # no example inputs: ranks unknown, transpose(-1, -2) is ambiguous
    assert counts == {"permute_chains": 0}
    assert any("rank unknown" in note for note in gm.meta["dsnas.passes"]["notes"])


class Transposes(nn.Module):
    def forward(self, x):
        return x.transpose(0, 1).transpose(-1, -2)


# ---- (3) redundant contiguous -----------------------------------------------------------------------------------


class Contiguous(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(4)

    def forward(self, x):  # (b, t, 4)
        a = self.ln(x).contiguous()  # (a) layer_norm's output is contiguous
        b = F.layer_norm(x.transpose(0, 1).contiguous(), (4,))  # (b) layer_norm makes its input contiguous itself
        c = x.transpose(0, 1).contiguous().view(-1, 4)  # (c) -> x.transpose(0, 1).reshape(-1, 4)
        d = x.transpose(1, 2).contiguous()  # returned: the caller may rely on its layout
        e = x.transpose(0, 1).contiguous().sum(-1)  # a reduction's summation order follows the layout
        return a + 1, b, c * 2, d, e


class WritesInPlace(nn.Module):
    def forward(self, x):  # (b, t, d), d even
        y = x.transpose(0, 1).contiguous().view(x.shape[1], x.shape[0], 2, -1)
        y.mul_(2)  # x.transpose(0, 1).reshape(...) is a view of x (splitting d needs no copy): x would change
        return y + 0


def test_redundant_contiguous_is_removed_only_where_provable():
    # Batch 1 makes x.transpose(0, 1) contiguous at run time: a pass that looked at the example would drop more.
    out = check(Contiguous(), [(1, 3, 4), (3, 1, 4), (2, 4, 4)], example=(1, 3, 4))
    assert out.counts["contiguous"] == 3
    assert shape_ops(out.module).count("contiguous") == 2
    assert delta(out) == 3


def test_contiguous_before_a_view_is_kept_when_the_graph_writes_in_place():
    x = torch.randn(2, 3, 4)
    out = optimize(WritesInPlace(), (x,))
    before = x.clone()
    assert torch.equal(out.module(x), WritesInPlace()(before.clone()))
    assert torch.equal(x, before)
    assert out.counts["contiguous"] == 0
    assert any("in place" in note for note in out.module.meta["dsnas.passes"]["notes"])


# ---- (4) reshape after transpose --------------------------------------------------------------------------------


class ReshapeAfterTranspose(nn.Module):
    def forward(self, x):  # (n, a, b, d)
        n, a, b, d = x.shape
        same = x.transpose(1, 2).reshape(n, b, a, d)  # the transposed shape itself: just the transpose
        other = x.transpose(1, 2).reshape(n, a, b, d)  # a real reshape (equal only when a == b): kept
        back = x.transpose(1, 2).reshape(n, b, a, d).transpose(1, 2)  # -> transpose pair -> x
        return same, other, back * 2


class ViewThenReshape(nn.Module):
    def forward(self, x):  # (n, t, h * d)
        n, t, _ = x.shape
        return x.view(n, t, 2, -1).transpose(1, 2).reshape(n, 2, t, -1)  # same -1 in the same place


def test_reshape_after_transpose_becomes_the_permute_only_when_shapes_match_symbolically():
    # (2, 3, 3, 4) is the trap: `other` reshapes to the transposed shape's values, but not to its symbols.
    out = check(ReshapeAfterTranspose(), [(2, 3, 3, 4), (1, 3, 5, 4), (3, 2, 5, 1)], example=(2, 3, 3, 4))
    assert out.counts["reshape_to_permute"] == 2
    assert out.counts["permute_chains"] == 1  # exposed by the dropped reshape
    assert shape_ops(out.module) == ["transpose", "transpose", "reshape"]


def test_reshape_after_view_and_transpose():
    out = check(ViewThenReshape(), [(2, 5, 6), (1, 5, 6), (3, 4, 4)])
    assert out.counts["reshape_to_permute"] == 1 and shape_ops(out.module) == ["view", "transpose"]


class IdentityPermuteThenWrite(nn.Module):
    def forward(self, x):
        y = x.transpose(0, 1).transpose(0, 1)  # a view of x: dropping it would hand y = x to relu_ ...
        return F.relu(y, True) + 0  # ... which is the same storage either way, but not the same object


class InPlaceModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(x.view(-1).view(2, -1))


@pytest.mark.parametrize("module, writer", [(WritesInPlace(), "mul_"), (IdentityPermuteThenWrite(), "relu"),
                                            (InPlaceModule(), "act")])
def test_in_place_writes_are_found_and_stop_alias_changing_rewrites(module, writer):
    ok, why = mutation_free(trace(module))
    assert not ok and writer in why and "in place" in why
    out = optimize(module, (torch.randn(2, 4, 2),))
    assert out.counts["view_chains"] == out.counts["permute_chains"] == 0


def test_mutation_free_for_out_of_place_graphs():
    assert mutation_free(trace(PermuteChain())) == (True, "")


# ---- framework --------------------------------------------------------------------------------------------------


class Branchy(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class DeviceBranch(nn.Module):
    def forward(self, x):
        return x * 2 if x.is_cuda else x + 1


class CountAdds:
    name = "count_adds"

    def run(self, gm: fx.GraphModule) -> int:
        return sum(n.target is operator.add for n in gm.graph.nodes)


def test_custom_pass_runs_and_is_a_pass():
    gm = trace(DeviceBranch())
    assert isinstance(CountAdds(), Pass) and isinstance(ViewChains(), Pass)
    assert isinstance(RedundantContiguous(), Pass) and isinstance(ReshapeToPermute(), Pass)
    # The pass "rewrites" one node each round without changing anything: run_passes stops after its rounds.
    assert run_passes(gm, [CountAdds()])["count_adds"] >= 1


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(x).transpose(0, 1).transpose(0, 1)


def test_shape_propagation_leaves_no_trace_in_the_model_or_the_random_state():
    model = Noisy().train()
    state = torch.get_rng_state()
    out = optimize(model, (torch.ones(3, 4),))
    assert torch.equal(torch.get_rng_state(), state) and model.training and out.module.drop.training
    assert out.counts["permute_chains"] == 1 and out.module.drop is model.drop  # shared, not copied


def test_device_questions_are_answered_for_the_trace_device():
    out = optimize(DeviceBranch(), (torch.ones(2),))
    assert torch.equal(out.module(torch.ones(2)), torch.full((2,), 2.0))
    assert out.module.meta["dsnas.device"] == "cpu"


def test_untraceable_model_raises_a_trial_error():
    with pytest.raises(TrialError, match="torch.fx can trace"):
        optimize(Branchy(), (torch.ones(2),))


# ---- the transformer family -------------------------------------------------------------------------------------


def test_transformer_family_is_traced_with_linear_layers_as_leaves_and_optimized_exactly():
    torch.manual_seed(0)
    model = build(ARCH).eval()
    out = optimize(model, (torch.randint(0, 256, (7, 64)),))
    calls = {n.target for n in out.module.graph.nodes if n.op == "call_module"}
    # nn.Linear or its engine subclass: a leaf either way, never traced into.
    assert {name for name, m in model.named_modules() if isinstance(m, nn.Linear)} <= calls
    with torch.no_grad():
        for batch in (1, 7):
            idx = torch.randint(0, 256, (batch, 64))
            assert torch.equal(model(idx), out.module(idx))
    assert all(v >= 0 for v in out.counts.values())


@pytest.mark.gpu
def test_transformer_family_on_cuda():
    torch.manual_seed(0)
    model = build(ARCH).eval().cuda()
    out = optimize(model, (torch.randint(0, 256, (7, 64), device="cuda"),))
    assert out.module.meta["dsnas.device"].startswith("cuda")
    with torch.no_grad():
        for batch in (1, 7):
            idx = torch.randint(0, 256, (batch, 64), device="cuda")
            assert torch.equal(model(idx), out.module(idx))
    assert check(PermuteChain(), [(2, 3, 4, 5), (3, 3, 3, 3)], device="cuda").counts["permute_chains"] == 4
    assert check(Contiguous().cuda(), [(1, 3, 4), (3, 1, 4)], device="cuda").counts["contiguous"] == 3


def test_the_node_counts_docs_engine_md_quotes_are_the_ones_benchmarks_passes_prints():
    """docs/engine.md quotes `python benchmarks/passes.py --quick`'s nodes column; it said 65 nodes for the family's
    d64 L2 (the benchmark printed 69->69) and 14 of 79 removed (14 is the rewrites; 79->61)."""
    import re

    sys.path.insert(0, BENCHMARKS)
    try:
        import passes
    finally:
        sys.path.remove(BENCHMARKS)
    counts = {}
    for verbose in (False, True):
        model = passes.make_model("d64 L2", verbose, torch.device("cpu"))
        _, opt, rewrites = passes.arms(model, torch.randint(0, passes.VOCAB, (2, passes.CONTEXT)))
        meta = opt.meta["dsnas.passes"]
        counts[verbose] = (meta["nodes_before"], meta["nodes_after"], sum(rewrites.values()))
    doc = " ".join((Path(BENCHMARKS).parent / "docs" / "engine.md").read_text().split())
    family, verbose = counts[False], counts[True]
    assert family[0] == family[1] and f"rewrite nothing ({family[0]} nodes before and after, d64 L2)" in doc
    said = re.findall(r"verbose port[^;]*", doc)
    assert f"{verbose[2]} rewrites take its {verbose[0]} nodes to {verbose[1]}" in doc, said
