"""Fusion math (`realign.ops.merge`) against direct computations on small hand-made tensors.

The expected values are computed entry by entry in plain Python from the papers' definitions, not with the module's
own helpers, so a slip in the vectorized code shows up as a mismatch.
"""

import json
import math
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from realign.ops import merge, nlsr, regions, streaming
from realign.ops.masks import rank_projection

ENTRYWISE = [name for name in merge.MERGE_METHODS if merge.get_merge_method(name).entrywise]
BASE = [0.5, -1.0, 2.0, 0.0, 1.5, -0.5]
FT = [1.5, -1.0, 1.0, 0.25, 2.5, -3.5]  # τ_ft  = [1, 0, -1, 0.25, 1, -3]
REF = [-0.5, 1.0, 1.5, 0.0, 3.5, 0.5]  # τ_ref = [-1, 2, -0.5, 0, 2, 1]


def _t(values):
    return torch.tensor(values, dtype=torch.float32)


def _taus():
    return ([f - b for f, b in zip(FT, BASE)], [r - b for r, b in zip(REF, BASE)])


def _sign(x):
    return (x > 0) - (x < 0)


def _direct_trim(tau, density):
    """TIES trimming by hand: the k = ⌊density·n⌋ ≥ 1 largest magnitudes, equal ones taken in index order."""
    k = max(1, int(density * len(tau)))
    kept = set(sorted(range(len(tau)), key=lambda i: (-abs(tau[i]), i))[:k])
    return [x if i in kept else 0.0 for i, x in enumerate(tau)]


def _direct_ties(base, taus, weights, density, scale, trim=True):
    kept = [_direct_trim(tau, density) if trim else tau for tau in taus]
    out = []
    for i, b in enumerate(base):
        weighted = [w * tau[i] for w, tau in zip(weights, kept)]
        elected = 1 if sum(weighted) >= 0 else -1
        agreeing = [(w, wt) for w, wt in zip(weights, weighted) if wt != 0 and _sign(wt) == elected]
        mean = sum(wt for _, wt in agreeing) / sum(w for w, _ in agreeing) if agreeing else 0.0
        out.append(b + scale * mean)
    return out


def _direct_consensus_keep(taus, tall_lambda, k):
    keep = []
    for i in range(len(taus[0])):
        total = sum(tau[i] for tau in taus)
        votes = sum(abs(tau[i]) >= tall_lambda * abs(total - tau[i]) for tau in taus)
        keep.append(votes >= k)
    return keep


def _fuse(method, **params):
    return merge.merge_tensors(method, merge.MergeParams(**params), _t(BASE), _t(FT), _t(REF))


def test_average_is_the_weighted_mean_of_the_weights():
    out = _fuse("average", weights=(1.0, 3.0))
    expected = [(1.0 * f + 3.0 * r) / 4.0 for f, r in zip(FT, REF)]
    assert torch.allclose(out, _t(expected), atol=1e-6)


def test_task_arithmetic_adds_lambda_times_the_weighted_task_vectors():
    tau_ft, tau_ref = _taus()
    out = _fuse("task_arithmetic", weights=(1.0, 0.5), scale=0.3)
    expected = [b + 0.3 * (1.0 * a + 0.5 * c) for b, a, c in zip(BASE, tau_ft, tau_ref)]
    assert torch.allclose(out, _t(expected), atol=1e-6)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.34, 0.1])
def test_ties_trims_elects_the_sign_and_averages_the_agreeing_entries(density):
    out = _fuse("ties", weights=(1.0, 1.0), density=density, scale=0.8)
    expected = _direct_ties(BASE, list(_taus()), (1.0, 1.0), density, 0.8)
    assert torch.allclose(out, _t(expected), atol=1e-6), (out, expected)


def test_ties_with_unequal_weights_and_equal_magnitudes():
    base = _t([0.0] * 6)
    ft, ref = [1.0, -1.0, 1.0, 2.0, -2.0, 0.5], [-1.0, 1.0, 1.0, -2.0, 1.0, -0.5]
    out = merge.merge_tensors("ties", merge.MergeParams(weights=(2.0, 1.0), density=0.5, scale=0.5), base, _t(ft),
                              _t(ref))
    expected = _direct_ties([0.0] * 6, [ft, ref], (2.0, 1.0), 0.5, 0.5)
    assert torch.allclose(out, _t(expected), atol=1e-6), (out, expected)


def test_ties_sign_election_ties_elect_plus_and_zero_entries_agree_with_no_sign():
    base = _t([0.0, 0.0, 0.0, 0.0])
    ft = _t([1.0, -1.0, 2.0, 0.0])
    ref = _t([-1.0, 1.0, -3.0, 0.0])
    out = merge.merge_tensors("ties", merge.MergeParams(density=1.0), base, ft, ref)
    # Σ τ = [0, 0, -1, 0]: a zero sum elects +, so entry 0 keeps the fine-tuned +1, entry 1 the reference's +1;
    # entry 2 elects − (the reference's −3); entry 3 has no non-zero entry and stays at θ0.
    assert out.tolist() == [1.0, 1.0, -3.0, 0.0]


def _kept(values, density, chunk_rows=None):
    tau = torch.tensor(values, dtype=torch.float32)
    trim = merge.MagnitudeTrim.of(tau.clone(), density)
    if chunk_rows is None:
        return trim.keep(tau).tolist()
    return [x for start in range(0, len(values), chunk_rows) for x in trim.keep(tau[start:start + chunk_rows]).tolist()]


def test_trimming_keeps_exactly_k_entries_taking_equal_magnitudes_in_order():
    assert _kept([3.0, -1.0, 1.0, 2.0], 0.5) == [True, False, False, True]  # k = 2: |3| and |2|
    assert _kept([3.0, -1.0, 1.0, 2.0], 0.75) == [True, True, False, True]  # k = 3: the first of the two |1|
    assert _kept([3.0, -1.0, 1.0, 2.0], 0.1) == [True, False, False, False]  # at least one entry
    assert _kept([3.0, -1.0, 1.0, 2.0], 1.0) == [True] * 4
    ties = [1.0, 2.0, -1.0, 1.0, 0.5, -1.0, 1.0, 3.0]  # k = 5: 3, 2 and the first three of the five |1|
    assert _kept(ties, 0.625) == [True, True, True, True, False, False, False, True]
    assert _kept(ties, 0.625, chunk_rows=3) == _kept(ties, 0.625), "chunk by chunk, the same entries"
    assert merge.trim_count(10, 0.29) == 2 and merge.trim_count(3, 0.01) == 1


def test_the_trim_found_from_chunks_is_the_whole_tensors_trim():
    """Radix selection over chunks (what streamed fusion uses) against the in-memory partition, on random vectors,
    vectors with many equal magnitudes, zeros, and every density from one entry to all."""
    generator = torch.Generator().manual_seed(0)
    cases = [torch.randn(1000, generator=generator),
             torch.randint(-3, 4, (997,), generator=generator).float(),  # seven magnitudes, heavy ties
             torch.zeros(64), torch.randn(5, generator=generator) * 1e-30, torch.tensor([2.5])]
    for tau in cases:
        for density in (0.0001, 0.1, 0.2, 0.5, 0.99, 1.0):
            whole = merge.MagnitudeTrim.of(tau.clone(), density)
            chunked = merge.MagnitudeTrim.of_chunks(lambda: tau.split(97), tau.numel(), density)
            assert (chunked.threshold, chunked.tied_quota) == (whole.threshold, whole.tied_quota), (tau[:5], density)


@pytest.mark.parametrize("tall_lambda, k", [(0.4, 2), (0.4, 1), (1.0, 2), (0.2, 2)])
def test_consensus_ta_keeps_entries_that_k_tall_masks_select(tall_lambda, k):
    tau_ft, tau_ref = _taus()
    out = _fuse("consensus_ta", weights=(1.0, 1.0), scale=0.7, tall_lambda=tall_lambda, consensus_k=k)
    keep = _direct_consensus_keep([tau_ft, tau_ref], tall_lambda, k)
    expected = [b + 0.7 * (a + c) * kept for b, a, c, kept in zip(BASE, tau_ft, tau_ref, keep)]
    assert torch.allclose(out, _t(expected), atol=1e-6)


def test_tall_masks_by_hand():
    # τ_MTL − τ_ft = τ_ref and vice versa for two models: m_ft = |τ_ft| ≥ λ|τ_ref|.
    masks = merge.tall_masks([_t([1.0, 0.1, 0.0]), _t([1.0, 1.0, 0.0])], 0.5)
    assert masks[0].tolist() == [True, False, True] and masks[1].tolist() == [True, True, True]
    assert merge.consensus_mask([_t([1.0, 0.1, 0.0]), _t([1.0, 1.0, 0.0])], 0.5, 2).tolist() == [True, False, True]


def test_consensus_ties_is_ties_zeroed_outside_the_consensus():
    tau_ft, tau_ref = _taus()
    out = _fuse("consensus_ties", weights=(1.0, 1.0), density=0.5, scale=1.0, tall_lambda=0.5, consensus_k=2)
    ties = _direct_ties(BASE, [tau_ft, tau_ref], (1.0, 1.0), 0.5, 1.0)
    keep = _direct_consensus_keep([tau_ft, tau_ref], 0.5, 2)
    expected = [t if kept else b for t, b, kept in zip(ties, BASE, keep)]
    assert torch.allclose(out, _t(expected), atol=1e-6)


def test_consensus_ties_authors_form_sums_agreeing_entries_and_builds_masks_against_that_sum():
    # nik-dim/tall_masks: τ_TIES = dis-sum of the trimmed vectors; m_t = |τ_t| > λ|τ_TIES − τ_t| (τ_t untrimmed).
    tau_ft, tau_ref = _taus()
    out = _fuse("consensus_ties_authors", weights=(1.0, 1.0), density=0.5, scale=0.8, tall_lambda=0.5, consensus_k=2)
    trimmed = [_direct_trim(tau, 0.5) for tau in (tau_ft, tau_ref)]
    expected = []
    for i, b in enumerate(BASE):
        values = [t[i] for t in trimmed]
        elected = 1 if sum(values) >= 0 else -1
        dis_sum = sum(v for v in values if v != 0 and _sign(v) == elected)
        votes = sum(abs(tau[i]) > 0.5 * abs(dis_sum - tau[i]) for tau in (tau_ft, tau_ref))
        expected.append(b + 0.8 * dis_sum * (votes >= 2))
    assert torch.allclose(out, _t(expected), atol=1e-6)
    paper = _fuse("consensus_ties", weights=(1.0, 1.0), density=0.5, scale=0.8, tall_lambda=0.5, consensus_k=2)
    assert not torch.allclose(out, paper), "the two forms differ on these vectors"


def test_restore_transplants_the_reference_bit_for_bit_and_keeps_the_dtype():
    ft = torch.randn(5, 3, dtype=torch.bfloat16)
    ref = torch.randn(5, 3, dtype=torch.bfloat16)
    assert torch.equal(merge.merge_tensors("restore", merge.MergeParams(), None, ft, ref), ref)
    mask = torch.tensor([[True, False, True]] * 5)
    plan = merge.FusionPlan(merge.get_merge_method("restore"), region=regions.FusionRegion("neurons", masks={"w": mask}))
    out = plan.fuse("w", None, ft, ref)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[mask], ref[mask]) and torch.equal(out[~mask], ft[~mask])


@pytest.mark.parametrize("method", ENTRYWISE)
def test_outside_the_region_the_finetuned_weights_stay_bit_identical(method):
    torch.manual_seed(0)
    base, ft, ref = (torch.randn(6, 4) for _ in range(3))
    mask = torch.rand(6, 4) > 0.6
    region = regions.FusionRegion("neurons", masks={"inside": mask})
    plan = merge.FusionPlan(merge.get_merge_method(method), merge.MergeParams(density=0.5, scale=0.5), region)
    out = plan.fuse("inside", base, ft, ref)
    unrestricted = merge.merge_tensors(method, merge.MergeParams(density=0.5, scale=0.5), base, ft, ref)
    assert torch.equal(out[~mask], ft[~mask])
    assert torch.equal(out[mask], unrestricted[mask])
    assert plan.fuse("elsewhere", base, ft, ref) is ft, "a parameter the region does not name is untouched"


@pytest.mark.parametrize("method", ENTRYWISE)
def test_an_empty_mask_changes_nothing(method):
    torch.manual_seed(1)
    base, ft, ref = (torch.randn(4, 4) for _ in range(3))
    region = regions.FusionRegion("neurons", masks={"w": torch.zeros(4, 4, dtype=torch.bool)})
    plan = merge.FusionPlan(merge.get_merge_method(method), merge.MergeParams(density=0.5), region)
    fused, changed = merge.fuse_state_dicts(plan, {"w": base}, {"w": ft}, {"w": ref})
    assert torch.equal(fused["w"], ft) and changed["w"] == (0, 16)


def test_safe_lora_is_not_computed_tensor_by_tensor():
    with pytest.raises(ValueError, match="not computed tensor by tensor"):
        merge.merge_tensors("safe_lora", merge.MergeParams(), torch.zeros(2), torch.ones(2), torch.ones(2))


def test_rank_region_adds_only_the_projected_change():
    torch.manual_seed(2)
    base, ft, ref = (torch.randn(4, 3) for _ in range(3))
    safety = torch.linalg.qr(torch.randn(4, 2)).Q
    utility = torch.linalg.qr(torch.randn(4, 1)).Q
    region = regions.region_from_file({"w::safety": safety, "w::utility": utility}, "ranks")
    projection = (torch.eye(4) - utility @ utility.T) @ safety @ safety.T
    assert torch.allclose(region.projections["w"], projection, atol=1e-6)
    for method in ("restore", "task_arithmetic"):
        plan = merge.FusionPlan(merge.get_merge_method(method), merge.MergeParams(scale=0.5), region)
        fused = merge.merge_tensors(method, merge.MergeParams(scale=0.5), base, ft, ref)
        expected = ft + projection @ (fused - ft)
        assert torch.allclose(plan.fuse("w", base, ft, ref), expected, atol=1e-6)
        assert plan.fuse("v", base, ft, ref) is ft
    # A utility basis equal to the safety basis leaves nothing to restore.
    same = regions.region_from_file({"w::safety": safety, "w::utility": safety}, "ranks")
    plan = merge.FusionPlan(merge.get_merge_method("restore"), region=same)
    assert torch.allclose(plan.fuse("w", None, ft, ref), ft, atol=1e-6)
    assert torch.allclose(rank_projection(safety, safety.new_zeros(4, 0)), safety @ safety.T)


def test_head_region_is_the_top_heads_q_rows_and_o_columns():
    head_dim, heads = 2, 4
    shapes = {f"model.layers.{i}.self_attn.{p}_proj.weight": (heads * head_dim, heads * head_dim)
              for i in range(2) for p in ("q", "k", "v", "o")}
    scores = {"model.layers.0.self_attn": torch.tensor([0.1, 5.0, 0.2, 0.3]),
              "model.layers.1.self_attn": torch.tensor([4.0, 0.0, 4.0, 0.1])}
    masks, selected = regions.head_masks(scores, 3 / 8, head_dim, shapes)
    # The 3 best of 8 heads: layer 0 head 1 (5.0), layer 1 heads 0 and 2 (4.0, tie kept in order).
    assert selected == [("model.layers.0.self_attn", 1), ("model.layers.1.self_attn", 0),
                        ("model.layers.1.self_attn", 2)]
    assert set(masks) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                          "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"}
    q0, o0 = masks["model.layers.0.self_attn.q_proj.weight"], masks["model.layers.0.self_attn.o_proj.weight"]
    assert q0[2:4].all() and q0.sum() == 2 * 8 and o0[:, 2:4].all() and o0.sum() == 2 * 8
    q1 = masks["model.layers.1.self_attn.q_proj.weight"]
    assert q1[0:2].all() and q1[4:6].all() and q1.sum() == 4 * 8
    assert not any("k_proj" in name or "v_proj" in name for name in masks), "GQA-shared k/v are left out"


def test_nlsr_probabilities_spread_by_similarity_rank():
    sims = [0.9, 0.1, 0.5]
    # Ranks: 0.9 → most similar (r̂ = 1), 0.5 → r̂ = 0.5, 0.1 → r̂ = 0; p over [0.3, 0.7].
    dissimilar = nlsr.replacement_probabilities(sims, prune_rate=0.5, epsilon=0.2)
    assert torch.allclose(dissimilar, torch.tensor([0.3, 0.7, 0.5], dtype=torch.float64))
    # The authors' code: argsort descending = [0, 2, 1]; ranks[that] = arange(4, 1, -1) = [4, 3, 2], so ranks
    # (4, 2, 3); min-max (1, 0, 0.5); p = (0.5 − 0.2) + 0.4·norm = (0.7, 0.3, 0.5).
    as_released = nlsr.replacement_probabilities(sims, 0.5, 0.2, prefer="similar")
    assert torch.allclose(as_released, torch.tensor([0.7, 0.3, 0.5], dtype=torch.float64))
    assert nlsr.replacement_probabilities([0.4], 0.5, 0.2).tolist() == [0.5]
    assert nlsr.replacement_probabilities([0.1, 0.2], 0.9, 0.2).max() == 1.0, "clipped to [0, 1]"


def test_nlsr_threshold_rule_replaces_modules_below_tau():
    assert nlsr.below_threshold([0.05, 0.1, -0.3, 0.9], 0.1).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="prefer"):
        nlsr.replacement_probabilities([0.1, 0.2], 0.5, 0.2, prefer="both")


def test_nlsr_sampling_is_the_seeded_bernoulli_draw():
    probabilities = torch.tensor([0.3, 0.7, 0.5, 0.1, 0.9, 0.5], dtype=torch.float64)
    torch.manual_seed(7)  # NLSR seeds torch, then draws torch.bernoulli
    expected = torch.bernoulli(probabilities).to(torch.bool)
    assert torch.equal(nlsr.sample_replaced(probabilities, 7), expected)
    assert torch.equal(nlsr.sample_replaced(probabilities, 7), nlsr.sample_replaced(probabilities, 7))
    assert not nlsr.sample_replaced(torch.zeros(4, dtype=torch.float64), 0).any()
    assert nlsr.sample_replaced(torch.ones(4, dtype=torch.float64), 0).all()


def test_lora_similarity_is_the_cosine_of_the_masked_products():
    torch.manual_seed(3)
    a_ft, a_ref = torch.randn(2, 5), torch.randn(2, 5)
    b_ft, b_ref = torch.randn(4, 2), torch.randn(4, 2)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    ft = {f"{key}.lora_A.weight": a_ft, f"{key}.lora_B.weight": b_ft}
    ref = {f"{key}.lora_A.weight": a_ref, f"{key}.lora_B.weight": b_ref}
    mask_a, mask_b = torch.rand(2, 5) > 0.3, torch.rand(4, 2) > 0.3
    region = regions.FusionRegion("neurons", masks={f"{key}.lora_A.weight": mask_a, f"{key}.lora_B.weight": mask_b})
    assert nlsr.lora_module_names(ft) == [key]
    (sim,) = nlsr.lora_update_similarities(ft, ref, [key], region)
    u = ((b_ft * mask_b) @ (a_ft * mask_a)).flatten().double()
    v = ((b_ref * mask_b) @ (a_ref * mask_a)).flatten().double()
    assert sim == pytest.approx(float(u @ v / (u.norm() * v.norm())), abs=1e-6)
    similarity = nlsr.UpdateSimilarity()
    similarity.add(torch.zeros(3), torch.zeros(3))
    assert similarity.value() == 1.0


def test_changed_fractions_per_layer():
    overall, per_layer = regions.changed_fractions({
        "model.layers.0.mlp.up_proj.weight": (3, 10), "model.layers.0.mlp.down_proj.weight": (1, 10),
        "model.layers.1.self_attn.q_proj.weight": (0, 5), "model.embed_tokens.weight": (5, 5)})
    assert per_layer == {0: 0.2, 1: 0.0} and overall == pytest.approx(9 / 30)


# --- streaming over files ------------------------------------------------------------------------------------------


def _write_model(folder, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture
def three_models(tmp_path):
    torch.manual_seed(4)
    shapes = {"model.embed_tokens.weight": (13, 3), "model.layers.0.self_attn.q_proj.weight": (8, 4),
              "model.layers.0.input_layernorm.weight": (4,), "model.layers.1.mlp.up_proj.weight": (6, 4),
              "model.norm.weight": (4,)}
    base = {name: torch.randn(shape) for name, shape in shapes.items()}
    ft = {name: t + 0.1 * torch.randn(t.shape) for name, t in base.items()}
    ref = {name: t + 0.1 * torch.randn(t.shape) for name, t in base.items()}
    ft["model.norm.weight"] = base["model.norm.weight"].clone()
    return (base, ft, ref), [_write_model(tmp_path / n, s) for n, s in (("base", base), ("ft", ft), ("ref", ref))]


@pytest.mark.parametrize("method,dare_rate", [(name, 0.0) for name in ENTRYWISE] + [
    (name, 0.4) for name in ENTRYWISE if "dare_rate" in merge.get_merge_method(name).uses])
@pytest.mark.parametrize("regioned", [False, True])
def test_streamed_fusion_equals_the_whole_tensor_fusion(three_models, tmp_path, method, regioned, dare_rate):
    (base, ft, ref), (base_dir, ft_dir, ref_dir) = three_models
    region = None
    if regioned:
        torch.manual_seed(5)
        region = regions.FusionRegion("neurons", masks={"model.embed_tokens.weight": torch.rand(13, 3) > 0.5,
                                                "model.layers.1.mlp.up_proj.weight": torch.rand(6, 4) > 0.5})
    params = merge.MergeParams(density=0.3, scale=0.6, dare_rate=dare_rate)
    plan = merge.FusionPlan(merge.get_merge_method(method), params, region)
    expected, expected_changed = merge.fuse_state_dicts(plan, base, ft, ref)
    with streaming.WeightFiles(ft_dir) as ft_files, streaming.WeightFiles(ref_dir) as ref_files, \
            streaming.WeightFiles(base_dir) as base_files:
        # 5 entries per chunk: the embedding goes through in rows of 1, the trim threshold stays whole-tensor.
        changed = streaming.stream_fusion(plan, streaming.StreamInputs(ft_files, ref_files, base_files), tmp_path / "out",
                                      chunk_elements=5)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(ft)
    for name in ft:
        assert torch.equal(out[name], expected[name]), name
    assert changed == expected_changed


def test_stream_writer_shards_and_writes_a_standard_file(three_models, tmp_path):
    (base, ft, ref), (base_dir, ft_dir, ref_dir) = three_models
    plan = merge.FusionPlan(merge.get_merge_method("average"))
    with streaming.WeightFiles(ft_dir) as ft_files, streaming.WeightFiles(ref_dir) as ref_files, \
            streaming.WeightFiles(base_dir) as base_files:
        streaming.stream_fusion(plan, streaming.StreamInputs(ft_files, ref_files, base_files), tmp_path / "out",
                            chunk_elements=7, max_shard_bytes=120)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0].startswith("model-00001-of-")
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in ft.values())
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / "out" / file), framework="pt") as handle:
            assert torch.allclose(handle.get_tensor(name), (ft[name] + ref[name]) / 2, atol=1e-6)
    with streaming.WeightFiles(tmp_path / "out") as reread:  # sharded input reads back like a single file
        assert sorted(reread.names) == sorted(ft)
    raw = (tmp_path / "out" / files[0]).read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    assert header_size % 8 == 0 and json.loads(raw[8:8 + header_size])["__metadata__"]["format"] == "pt"


def test_stream_refuses_inputs_of_another_shape(three_models, tmp_path):
    (base, ft, ref), (base_dir, ft_dir, _) = three_models
    other = dict(ref)
    other["model.norm.weight"] = torch.randn(5)
    other_dir = _write_model(tmp_path / "other", other)
    plan = merge.FusionPlan(merge.get_merge_method("restore"))
    with streaming.WeightFiles(ft_dir) as ft_files, streaming.WeightFiles(other_dir) as ref_files:
        with pytest.raises(ValueError, match="model.norm.weight: shape"):
            streaming.stream_fusion(plan, streaming.StreamInputs(ft_files, ref_files), tmp_path / "out")


def test_streamed_similarities_are_the_cosines_of_the_region_updates(three_models):
    (base, ft, ref), (base_dir, ft_dir, ref_dir) = three_models
    name = "model.embed_tokens.weight"
    mask = torch.rand(13, 3) > 0.5
    region = regions.FusionRegion("neurons", masks={name: mask})
    with streaming.WeightFiles(ft_dir) as ft_files, streaming.WeightFiles(ref_dir) as ref_files, \
            streaming.WeightFiles(base_dir) as base_files:
        (sim,) = streaming.stream_similarities([name], ft_files, ref_files, base_files, region, chunk_elements=4)
    u = ((ft[name] - base[name]) * mask).flatten().double()
    v = ((ref[name] - base[name]) * mask).flatten().double()
    assert sim == pytest.approx(float(u @ v / (u.norm() * v.norm())), abs=1e-9)
    assert math.isfinite(sim)


def test_streamed_ties_breaks_magnitude_ties_like_the_whole_tensor(tmp_path):
    # Small integers: most magnitudes tie, and the k-th one falls inside a run of equal values spread over chunks.
    generator = torch.Generator().manual_seed(6)
    base = {"w": torch.zeros(9, 4)}
    ft = {"w": torch.randint(-2, 3, (9, 4), generator=generator).float()}
    ref = {"w": torch.randint(-2, 3, (9, 4), generator=generator).float()}
    dirs = [_write_model(tmp_path / n, s) for n, s in (("base", base), ("ft", ft), ("ref", ref))]
    plan = merge.FusionPlan(merge.get_merge_method("ties"), merge.MergeParams(density=0.3))
    expected, _ = merge.fuse_state_dicts(plan, base, ft, ref)
    with streaming.WeightFiles(dirs[1]) as f, streaming.WeightFiles(dirs[2]) as r, streaming.WeightFiles(dirs[0]) as b:
        streaming.stream_fusion(plan, streaming.StreamInputs(f, r, b), tmp_path / "out", chunk_elements=8)
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["w"], expected["w"])
    direct = _direct_ties([0.0] * 36, [ft["w"].flatten().tolist(), ref["w"].flatten().tolist()], (1.0, 1.0), 0.3, 1.0)
    assert torch.equal(expected["w"].flatten(), _t(direct))
