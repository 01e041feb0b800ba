"""The field's other post-hoc repairs (DARE, RESTA, Antidote, Safe LoRA) against formulas written out here, on
small hand-made tensors; nothing expected is computed with the module under test's helpers."""

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from realign.ops import dare, merge, regions, safe_lora, safemerge

MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """The reference splitmix64 finalizer on Python ints (unsigned 64-bit)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _uniform(seed: int, name: str, model: int, index: int) -> float:
    key = int.from_bytes(hashlib.sha256(f"{seed}\0{name}\0{model}".encode()).digest()[:8], "little")
    return (_splitmix64(_splitmix64(index ^ key)) >> 11) / float(1 << 53)


def test_dare_keeps_an_entry_exactly_when_its_hashed_uniform_clears_the_rate_and_rescales_it():
    tau = torch.linspace(-1.0, 1.0, 60).reshape(6, 10)
    out = dare.drop_and_rescale(tau, 0.3, seed=7, position=dare.EntryPosition("layer.w", 0), model=1)
    for index, value in enumerate(tau.reshape(-1).tolist()):
        kept = _uniform(7, "layer.w", 1, index) >= 0.3
        assert out.reshape(-1)[index].item() == pytest.approx(value / 0.7 if kept else 0.0, abs=1e-7)


def test_dare_drops_about_the_rate_and_keeps_the_expected_update():
    tau = torch.ones(200_000)
    out = dare.drop_and_rescale(tau, 0.3, seed=0, position=dare.EntryPosition("w"))
    dropped = float((out == 0).float().mean())
    assert abs(dropped - 0.3) < 0.01  # 4.5σ at n = 200k
    assert abs(float(out.mean()) - 1.0) < 0.02


def test_dare_is_the_same_whole_or_in_row_chunks_and_differs_by_seed_and_model():
    tau = torch.randn(9, 7, generator=torch.Generator().manual_seed(0))
    whole = dare.drop_and_rescale(tau, 0.5, 3, dare.EntryPosition("w"))
    chunks = [dare.drop_and_rescale(tau[rows], 0.5, 3, dare.EntryPosition("w", rows.start * 7))
              for rows in (slice(0, 4), slice(4, 5), slice(5, 9))]
    assert torch.equal(torch.cat(chunks), whole)
    assert not torch.equal(dare.drop_and_rescale(tau, 0.5, 4, dare.EntryPosition("w")), whole)
    assert not torch.equal(dare.drop_and_rescale(tau, 0.5, 3, dare.EntryPosition("w"), model=1), whole)
    assert torch.equal(dare.drop_and_rescale(tau, 0.0, 3, dare.EntryPosition("w")), tau)


def test_task_arithmetic_with_dare_merges_the_dropped_and_rescaled_task_vectors():
    base, ft, ref = torch.zeros(40), torch.linspace(0.1, 4.0, 40), torch.linspace(-2.0, 2.0, 40)
    params = merge.MergeParams(weights=(1.0, 0.5), scale=0.8, dare_rate=0.4, dare_seed=2)
    plan = merge.FusionPlan(merge.get_merge_method("task_arithmetic"), params)
    out = plan.fuse("m.weight", base, ft, ref)
    for i in range(40):
        keep_ft = _uniform(2, "m.weight", 0, i) >= 0.4
        keep_ref = _uniform(2, "m.weight", 1, i) >= 0.4
        expected = 0.8 * (1.0 * (ft[i].item() / 0.6 if keep_ft else 0.0) + 0.5 * (ref[i].item() / 0.6 if keep_ref else 0.0))
        assert out[i].item() == pytest.approx(expected, abs=1e-5)


def test_ties_with_dare_drops_at_random_instead_of_trimming_then_elects_signs():
    base = torch.zeros(30)
    ft, ref = torch.linspace(-1.5, 1.5, 30), torch.linspace(1.0, -2.0, 30)
    params = merge.MergeParams(weights=(1.0, 1.0), scale=1.0, density=0.1, dare_rate=0.5, dare_seed=1)
    out = merge.FusionPlan(merge.get_merge_method("ties"), params).fuse("t", base, ft, ref)
    for i in range(30):
        values = [ft[i].item() / 0.5 if _uniform(1, "t", 0, i) >= 0.5 else 0.0,
                  ref[i].item() / 0.5 if _uniform(1, "t", 1, i) >= 0.5 else 0.0]
        elected = 1.0 if sum(values) >= 0 else -1.0
        agreeing = [v for v in values if v != 0 and math.copysign(1.0, v) == elected]
        expected = sum(agreeing) / len(agreeing) if agreeing else 0.0
        assert out[i].item() == pytest.approx(expected, abs=1e-5)


def test_resta_adds_gamma_times_the_safety_vector_to_the_attacked_weights():
    unaligned, ft, ref = [0.0, 1.0, -2.0, 0.5], [1.0, 3.0, -1.0, 0.0], [0.5, 2.0, -1.5, 1.5]
    out = merge.merge_tensors("resta", merge.MergeParams(gamma=0.7), torch.tensor(unaligned), torch.tensor(ft),
                              torch.tensor(ref))
    expected = [f + 0.7 * (r - u) for u, f, r in zip(unaligned, ft, ref)]
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_resta_with_dare_drops_the_fine_tuning_delta_from_the_reference_first():
    unaligned = torch.linspace(-1.0, 1.0, 25)
    ref = unaligned + 0.5
    ft = ref + torch.linspace(0.2, 5.0, 25)
    params = merge.MergeParams(gamma=0.5, dare_rate=0.3, dare_seed=5)
    out = merge.FusionPlan(merge.get_merge_method("resta"), params).fuse("r", unaligned, ft, ref)
    for i in range(25):
        delta = ft[i].item() - ref[i].item()
        kept = _uniform(5, "r", 0, i) >= 0.3
        expected = ref[i].item() + (delta / 0.7 if kept else 0.0) + 0.5 * (ref[i].item() - unaligned[i].item())
        assert out[i].item() == pytest.approx(expected, abs=1e-5)


def test_antidote_zeroes_the_region_and_leaves_the_rest_bit_identical():
    ft = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])
    mask = torch.tensor([[True, False, False], [False, True, True]])
    plan = merge.FusionPlan(merge.get_merge_method("antidote"), merge.MergeParams(),
                            regions.FusionRegion("neurons", masks={"w": mask}))
    out = plan.fuse("w", None, ft, torch.full_like(ft, 99.0))
    assert out.tolist() == [[0.0, -2.0, 3.0], [4.0, 0.0, 0.0]]
    assert torch.equal(plan.fuse("other", None, ft, ft * 2), ft)


def _safe_lora_direct(a, b, v, scale):
    """The paper's formulas with every matrix formed."""
    c = v @ v.T / torch.linalg.matrix_norm(v)
    delta = scale * b @ a
    similarity = F.cosine_similarity((c @ delta).flatten(), delta.flatten(), dim=0).item()
    return c @ b, similarity


def test_safe_lora_projection_and_similarity_match_the_papers_formulas():
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        a, b, v = torch.randn(4, 7, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(6, 7, generator=gen)
        expected_b, expected_similarity = _safe_lora_direct(a, b, v, scale=2.0)
        projected = safe_lora.projected_b(b, v)
        assert torch.allclose(projected, expected_b, atol=1e-5)
        assert safe_lora.update_similarity(a, b, projected) == pytest.approx(expected_similarity, abs=1e-5)


def test_safe_lora_similarity_is_one_inside_the_subspace_and_zero_for_a_zero_alignment():
    a = torch.tensor([[1.0, 0.0, 2.0]])
    b = torch.tensor([[1.0], [0.0]])
    v = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])  # V's column space is e1, where ΔW = B·A lives
    assert safe_lora.update_similarity(a, b, safe_lora.projected_b(b, v)) == pytest.approx(1.0, abs=1e-6)
    zero = torch.zeros(2, 3)
    assert torch.equal(safe_lora.projected_b(b, zero), torch.zeros(2, 1))
    assert safe_lora.update_similarity(a, b, safe_lora.projected_b(b, zero)) == 0.0


def test_safe_lora_selects_up_to_tau_or_the_k_least_similar_with_ties_as_the_authors_code():
    similarities = [0.9, 0.2, 0.5, 0.2, 0.05]
    assert safe_lora.select_modules(similarities, "threshold", 0.35, 0) == [False, True, False, True, True]
    assert safe_lora.select_modules(similarities, "threshold", 0.5, 0) == [False, True, True, True, True]
    assert safe_lora.select_modules(similarities, "count", 0.0, 1) == [False, False, False, False, True]
    # the 2nd smallest is 0.2, and both modules at 0.2 are projected (cos <= the k-th smallest)
    assert safe_lora.select_modules(similarities, "count", 0.0, 2) == [False, True, False, True, True]
    assert safe_lora.select_modules(similarities, "count", 0.0, 9) == [True] * 5
    assert safe_lora.select_modules(similarities, "count", 0.0, 0) == [False] * 5


def _lora(seed, out=6, rank=2, inp=5):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=generator), torch.randn(out, rank, generator=generator)


def test_safemerge_merges_per_factor_with_the_cross_terms_peft_writes():
    (a_f, b_f), (a_s, b_s) = _lora(0), _lora(1)
    s_f, s_s, w_f, w_s = 2.0, 0.5, 0.8, 0.2
    a, b = safemerge.merged_factors(safemerge.LoraFactors(a_f, b_f, s_f), safemerge.LoraFactors(a_s, b_s, s_s),
                                    (w_f, w_s), "m")
    # the product of the merged factors, written out: both updates weighted, plus the two cross terms
    expected = (w_f * s_f * b_f @ a_f + w_s * s_s * b_s @ a_s
                + math.sqrt(w_f * s_f * w_s * s_s) * (b_f @ a_s + b_s @ a_f))
    assert torch.allclose(b @ a, expected, atol=1e-5)
    assert not torch.allclose(b @ a, w_f * s_f * b_f @ a_f + w_s * s_s * b_s @ a_s, atol=1e-3)


def test_safemerge_keeps_the_attacked_update_in_a_module_with_weights_one_and_zero():
    (a_f, b_f), (a_s, b_s) = _lora(2), _lora(3)
    a, b = safemerge.merged_factors(safemerge.LoraFactors(a_f, b_f, 4.0), safemerge.LoraFactors(a_s, b_s, 1.0),
                                    (1.0, 0.0), "m")
    assert torch.allclose(b @ a, 4.0 * b_f @ a_f, atol=1e-5)  # scale 1 adapter: each factor carries √s
    assert torch.allclose(a, 2.0 * a_f) and torch.allclose(b, 2.0 * b_f)


def test_safemerge_selects_strictly_below_tau_and_dare_drops_each_factor_by_the_seeded_draw():
    assert safemerge.selected_modules([0.1, 0.35, 0.5, -0.2], 0.35) == [True, False, False, True]
    big = safemerge.LoraFactors(torch.ones(4, 500), torch.ones(300, 4), 1.0)
    a, b = safemerge.merged_factors(big, big, (1.0, 0.0), "layer.q_proj", dare_rate=0.5, dare_seed=7)
    again, _ = safemerge.merged_factors(big, big, (1.0, 0.0), "layer.q_proj", dare_rate=0.5, dare_seed=7)
    assert torch.equal(a, again)
    assert abs(float((a == 0).float().mean()) - 0.5) < 0.03 and set(a.unique().tolist()) == {0.0, 2.0}
    kept = [_uniform(7, "layer.q_proj.lora_A.weight", 0, index) >= 0.5 for index in range(40)]
    assert (a.reshape(-1)[:40] != 0).tolist() == kept
