"""Scoring math on the tiny model, each score against a direct computation in the test: gradients from the model's
own loss one example at a time, activations captured whole by hooks and cut to the response tokens here."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file

from realign import data, models
from realign.config import DEFAULT_TARGET_MODULES, ModelConfig
from realign.errors import RealignError
from realign.ops import masks, neurons, selection

TINY = ModelConfig(name="tiny", source="tiny")
MAX_LENGTH = 96


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(TINY)


@pytest.fixture
def model():
    return models.load_model(TINY, device="cpu")


def _examples(tokenizer, n=5):
    """Harmful prompts with refusals, as (prompt ids, response ids): the safety calibration data."""
    rows = data.pku_saferlhf("train", n, 0)
    return [(tokenizer(data.format_prompt(row["prompt"]))["input_ids"],
             tokenizer(row[f"response_{row['safer_response_id']}"], add_special_tokens=False)["input_ids"]
             + [tokenizer.eos_token_id]) for row in rows]


@pytest.fixture(scope="module")
def batches(tokenizer):
    # 5 examples in batches of 2: padding, a partial batch, and prompts cut at MAX_LENGTH.
    return neurons.collate(_examples(tokenizer), tokenizer.pad_token_id, MAX_LENGTH, 2)


def _unpadded(batches):
    """Each example alone, exactly as collated: (input ids (1, n), labels (1, n))."""
    for batch in batches:
        for row in range(batch.input_ids.shape[0]):
            n = int(batch.attention_mask[row].sum())
            yield batch.input_ids[row:row + 1, :n], batch.labels[row:row + 1, :n]


def _response_inputs(model, modules, batches, outputs=False):
    """Per module, the inputs (or outputs) at response-token positions, captured whole and cut here."""
    rows = {m.key: [] for m in modules}
    for input_ids, labels in _unpadded(batches):
        captured = {}
        handles = [m.module.register_forward_hook(
            lambda mod, args, out, key=m.key: captured.__setitem__(key, (out if outputs else args[0])[0]))
            for m in modules]
        with torch.no_grad():
            model(input_ids=input_ids)
        for handle in handles:
            handle.remove()
        positions = labels[0] != -100
        for key, tensor in captured.items():
            rows[key].append(tensor[positions].double())
    return {key: torch.cat(parts) for key, parts in rows.items()}


def _direct_snip(model, modules, batches):
    """|W ⊙ Σ_x ∇_W L(x)| with L(x) the model's own mean cross-entropy on x's response tokens."""
    weights = [m.weight for m in modules]
    for weight in weights:
        weight.requires_grad_(True)
    sums = [torch.zeros_like(w) for w in weights]
    for input_ids, labels in _unpadded(batches):
        loss = model(input_ids=input_ids, labels=labels).loss
        for total, grad in zip(sums, torch.autograd.grad(loss, weights)):
            total += grad
    for weight in weights:
        weight.requires_grad_(False)
    return {m.key: (m.weight.detach() * total).abs() for m, total in zip(modules, sums)}


def _assert_top_mask(mask, score, fraction):
    """`mask` holds the ⌊fraction · numel⌋ largest entries of `score` (entries within float noise of the cut may go
    either way)."""
    count = int(fraction * score.numel())
    assert mask.dtype == torch.bool and mask.shape == score.shape
    assert int(mask.sum()) == count
    threshold = score.flatten().kthvalue(score.numel() - count + 1).values
    noise = 1e-5 * float(score.abs().max())
    assert bool(mask[score > threshold + noise].all()), "a clearly top score was left out"
    assert not bool(mask[score < threshold - noise].any()), "a clearly lower score was selected"


def test_collate_marks_only_response_tokens_and_keeps_the_response_of_long_examples():
    batches = neurons.collate([([1, 2, 3], [4, 5]), ([6, 7, 8, 9, 10, 11], [12, 13, 14])], pad_token_id=0,
                              max_length=6, batch_size=2)
    assert len(batches) == 1
    batch = batches[0]
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 0], [9, 10, 11, 12, 13, 14]]
    assert batch.labels.tolist() == [[-100, -100, -100, 4, 5, -100], [-100, -100, -100, 12, 13, 14]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert batch.response_mask.sum().item() == 5
    cut = neurons.collate([([1, 2], list(range(3, 13)))], pad_token_id=0, max_length=4, batch_size=1)[0]
    assert cut.input_ids.tolist() == [[2, 3, 4, 5]] and cut.labels.tolist() == [[-100, 3, 4, 5]]


def test_response_loss_is_the_sum_of_each_examples_mean_response_loss(model, batches):
    expected = sum(float(model(input_ids=i, labels=l).loss) for i, l in _unpadded(batches))
    for chunk_tokens in (3, 64, 10_000):  # logits recomputed chunk by chunk: the same sum
        actual = sum(float(neurons.response_loss_sum(model, batch, chunk_tokens)) for batch in batches)
        assert actual == pytest.approx(expected, rel=1e-5), chunk_tokens


def test_wanda_is_weight_magnitude_times_input_channel_norm_over_response_tokens(model, batches):
    modules = neurons.find_scored_modules(model, DEFAULT_TARGET_MODULES, "weights")
    assert len(modules) == 14 and modules[0].key == "model.layers.0.self_attn.q_proj.weight"
    inputs = _response_inputs(model, modules, batches)
    scores = {m.key: score for m, score in neurons.wanda_scores(model, modules, batches, budget_bytes=10**9)}
    for scored in modules:
        expected = scored.weight.double().abs() * inputs[scored.key].norm(dim=0)
        assert torch.allclose(scores[scored.key].double(), expected, rtol=1e-4, atol=1e-7), scored.key


def test_snip_is_weight_times_summed_response_gradient_with_any_number_of_passes(model, batches):
    modules = neurons.find_scored_modules(model, DEFAULT_TARGET_MODULES, "weights")
    expected = _direct_snip(model, modules, batches)
    one_layer = neurons.plan_passes(modules, lambda m: m.weight.numel() * 4, budget_bytes=1)
    assert len(one_layer) == 2, "a budget smaller than a layer: one pass per layer"
    for budget in (1, 10**9):
        scores = {m.key: s for m, s in neurons.snip_scores(model, modules, batches, budget_bytes=budget)}
        for key, score in expected.items():
            assert torch.allclose(scores[key], score, rtol=1e-4, atol=1e-8), (budget, key)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters()), "model left as it was"


def test_top_fraction_selection_and_snip_mask_per_matrix(model, batches):
    modules = neurons.find_scored_modules(model, ["q_proj", "down_proj"], "weights")
    expected = _direct_snip(model, modules, batches)
    region = selection.score_region("snip", model, modules, batches, [], selection.ScoreSettings(sparsity=0.05))
    assert region.kind == "neurons" and set(region.tensors) == set(expected)
    for key, score in expected.items():
        _assert_top_mask(region.tensors[key], score, 0.05)
        assert region.selected[key] == int(0.05 * score.numel()) and region.totals[key] == score.numel()


def test_set_difference_on_hand_made_scores():
    safety = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.2, 0.3]])
    utility = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.1, 0.8]])
    # top-q = ⌊0.5·6⌋ = 3 safety entries: (0,0) (0,1) (1,0); top-p = ⌊0.34·6⌋ = 2 utility entries: (0,0) (1,2).
    mask = neurons.set_difference_mask(safety, utility, top_q=0.5, top_p=0.34)
    assert mask.tolist() == [[False, True, False], [True, False, False]]
    assert neurons.set_difference_mask(safety, utility, top_q=0.5, top_p=0.01).sum() == 3, "p rounds down to none"
    assert neurons.top_fraction_mask(safety, 0.1).sum() == 0


def test_set_difference_region_is_safety_top_q_minus_utility_top_p(model, tokenizer, batches):
    rows = data.benign_instructions("train", 4, 0)
    utility = neurons.collate([(tokenizer(data.format_prompt(r["instruction"], r["input"]))["input_ids"],
                                tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in rows],
                              tokenizer.pad_token_id, MAX_LENGTH, 2)
    modules = neurons.find_scored_modules(model, ["o_proj", "up_proj"], "weights")
    safety_inputs, utility_inputs = _response_inputs(model, modules, batches), _response_inputs(model, modules, utility)
    settings = selection.ScoreSettings(top_q=0.2, top_p=0.2, difference_score="wanda")
    region = selection.score_region("set_difference", model, modules, batches, utility, settings)
    for scored in modules:
        safety_score = scored.weight.double().abs() * safety_inputs[scored.key].norm(dim=0)
        utility_score = scored.weight.double().abs() * utility_inputs[scored.key].norm(dim=0)
        expected = neurons.set_difference_mask(safety_score, utility_score, 0.2, 0.2)
        assert torch.equal(region.tensors[scored.key], expected), scored.key
        assert 0 < region.selected[scored.key] < int(0.2 * scored.weight.numel())


def test_actsvd_grams_and_bases_match_the_svd_of_the_layer_outputs(model, tokenizer, batches):
    modules = neurons.find_scored_modules(model, DEFAULT_TARGET_MODULES, "weights")
    inputs = _response_inputs(model, modules, batches)
    grams = {m.key: gram for m, gram in neurons.output_grams(model, modules, batches, budget_bytes=10**9)}
    rank = 4
    for scored in modules:
        s = inputs[scored.key] @ scored.weight.double().T  # (response tokens, d_out) = X Wᵀ
        assert torch.allclose(grams[scored.key].matrix(), s.T @ s, rtol=1e-4, atol=1e-6), scored.key
        _, singular, right = torch.linalg.svd(s, full_matrices=False)
        assert singular[rank - 1] > 1.01 * singular[rank], "the test needs a spectral gap at the rank"
        expected = right[:rank].T @ right[:rank]  # projection onto the top-r output directions
        basis = grams[scored.key].top_directions(rank).double()
        assert torch.allclose(basis.T @ basis, torch.eye(rank, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(basis @ basis.T, expected, atol=1e-4), scored.key


def test_actsvd_region_with_utility_ranks_is_the_orthogonal_projection(model, tokenizer, batches):
    rows = data.benign_instructions("train", 4, 0)
    utility = neurons.collate([(tokenizer(data.format_prompt(r["instruction"], r["input"]))["input_ids"],
                                tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in rows],
                              tokenizer.pad_token_id, MAX_LENGTH, 4)
    modules = neurons.find_scored_modules(model, ["q_proj", "gate_proj"], "weights")
    safety_inputs, utility_inputs = _response_inputs(model, modules, batches), _response_inputs(model, modules, utility)
    settings = selection.ScoreSettings(safety_rank=3, utility_rank=2)
    region = selection.score_region("actsvd", model, modules, batches, utility, settings)
    assert region.kind == "ranks"
    for scored in modules:
        d_out = scored.weight.shape[0]
        us = torch.linalg.svd(safety_inputs[scored.key] @ scored.weight.double().T, full_matrices=False)[2][:3].T
        uu = torch.linalg.svd(utility_inputs[scored.key] @ scored.weight.double().T, full_matrices=False)[2][:2].T
        expected = (torch.eye(d_out, dtype=torch.float64) - uu @ uu.T) @ us @ us.T
        safety_basis, utility_basis = region.tensors[f"{scored.key}::safety"], region.tensors[f"{scored.key}::utility"]
        assert safety_basis.shape == (d_out, 3) and utility_basis.shape == (d_out, 2)
        assert torch.allclose(masks.rank_projection(safety_basis, utility_basis).double(), expected, atol=1e-4)
        assert region.selected[scored.key] == 3 and region.totals[scored.key] == min(scored.weight.shape)
    plain = selection.score_region("actsvd", model, modules, batches, [], selection.ScoreSettings(safety_rank=3))
    assert all(plain.tensors[f"{m.key}::utility"].shape == (m.weight.shape[0], 0) for m in modules)


def test_lora_actsvd_keeps_top_directions_of_each_lora_matrix_then_its_largest_entries(model, batches):
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                                  init_lora_weights=False))  # random A and B: nothing is zero
    peft_model.eval()
    modules = neurons.find_scored_modules(peft_model, ["q_proj", "down_proj"], "lora")
    assert [m.kind for m in modules[:2]] == ["q_proj.lora_A", "q_proj.lora_B"]
    assert modules[0].key == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    inputs = _response_inputs(peft_model, modules, batches)
    region = selection.score_region("lora_actsvd", peft_model, modules, batches, [],
                                  selection.ScoreSettings(sparsity=0.2, lora_rank_fraction=0.8, lora_sequential=False))
    for scored in modules:
        weight = scored.weight.detach().double()
        kept = int(0.8 * min(weight.shape))
        right = torch.linalg.svd(inputs[scored.key] @ weight.T, full_matrices=False)[2][:kept].T
        _assert_top_mask(region.tensors[scored.key], (right @ right.T @ weight).abs(), 0.2)


def test_sequential_lora_actsvd_scores_each_layer_on_the_earlier_layers_already_projected(model, batches):
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                                  init_lora_weights=False))
    peft_model.eval()
    modules = neurons.find_scored_modules(peft_model, ["q_proj", "down_proj"], "lora")
    original = {m.key: m.weight.detach().clone() for m in modules}
    region = selection.score_region("lora_actsvd", peft_model, modules, batches, [],
                                  selection.ScoreSettings(sparsity=0.2, lora_rank_fraction=0.8))
    assert all(torch.equal(m.weight, original[m.key]) for m in modules), "the adapter is restored afterwards"
    # By hand, as NLSR's wrapper: for each layer in order, record its matrices' inputs on the model as it is now,
    # project them (W ← U_k U_kᵀ W) after the whole layer is recorded, and go on.
    expected = {}
    with torch.no_grad():
        for layer in sorted({m.layer for m in modules}):
            group = [m for m in modules if m.layer == layer]
            inputs = _response_inputs(peft_model, group, batches)
            projected = {}
            for scored in group:
                weight = scored.weight.detach().double()
                kept = int(0.8 * min(weight.shape))
                right = torch.linalg.svd(inputs[scored.key] @ weight.T, full_matrices=False)[2][:kept].T
                projected[scored.key] = right @ right.T @ weight
            for scored in group:
                expected[scored.key] = projected[scored.key].abs()
                scored.weight.copy_(projected[scored.key].to(scored.weight.dtype))
        for scored in modules:
            scored.weight.copy_(original[scored.key])
    for scored in modules:
        _assert_top_mask(region.tensors[scored.key], expected[scored.key], 0.2)
    later = [m for m in modules if m.layer > min(x.layer for x in modules)]
    flat = selection.score_region("lora_actsvd", peft_model, modules, batches, [],
                                selection.ScoreSettings(sparsity=0.2, lora_rank_fraction=0.8, lora_sequential=False))
    assert any(not torch.equal(flat.tensors[m.key], region.tensors[m.key]) for m in later), \
        "the projected earlier layers change what the later layers see"


def test_row_comparison_selects_the_top_fraction_of_each_output_row():
    score = torch.tensor([[1.0, 5.0, 3.0, 2.0], [9.0, 8.0, 7.0, 0.0], [0.0, 0.0, 1.0, 4.0]])
    mask = neurons.top_fraction_mask_rows(score, 0.5)
    assert mask.tolist() == [[False, True, True, False], [True, True, False, False], [False, False, True, True]]
    per_matrix = neurons.top_fraction_mask(score, 0.5)
    assert per_matrix.sum() == 6 and not torch.equal(mask, per_matrix)


def test_wanda_per_row_keeps_the_same_count_in_every_row(model, batches):
    modules = neurons.find_scored_modules(model, ["q_proj"], "weights")
    region = selection.score_region("wanda", model, modules, batches, [],
                                  selection.ScoreSettings(sparsity=0.25, comparison="row"))
    for scored in modules:
        counts = region.tensors[scored.key].sum(dim=1)
        assert torch.all(counts == int(0.25 * scored.weight.shape[1]))


def test_head_sums_are_each_heads_q_rows_and_o_columns(model, batches):
    modules = neurons.find_scored_modules(model, DEFAULT_TARGET_MODULES, "weights")
    num_heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // num_heads
    inputs = _response_inputs(model, modules, batches)
    region = selection.score_region("wanda", model, modules, batches, [],
                                  selection.ScoreSettings(sparsity=0.1, num_heads=num_heads))
    assert set(region.heads) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    for layer in (0, 1):
        scores = {}
        for kind in ("q_proj", "o_proj"):
            scored = next(m for m in modules if m.layer == layer and m.kind == kind)
            scores[kind] = scored.weight.double().abs() * inputs[scored.key].norm(dim=0)
        expected = torch.tensor([float(scores["q_proj"][h * head_dim:(h + 1) * head_dim].sum()
                                       + scores["o_proj"][:, h * head_dim:(h + 1) * head_dim].sum())
                                 for h in range(num_heads)], dtype=torch.float64)
        assert torch.allclose(region.heads[f"model.layers.{layer}.self_attn"].double(), expected, rtol=1e-4)


def test_masks_round_trip_through_plain_safetensors(tmp_path):
    generator = torch.Generator().manual_seed(0)
    region = {"model.layers.0.self_attn.q_proj.weight": torch.rand(6, 4, generator=generator) > 0.7,
              "model.layers.0.mlp.down_proj.weight": torch.rand(4, 9, generator=generator) > 0.7}
    meta = {"realign.method": "wanda", "realign.target": "weights", "realign.base_model": "tiny",
            "realign.architecture": "llama:2"}
    path = masks.save_region(tmp_path / "wanda.safetensors", region, "neurons", meta)
    loaded = load_file(str(path))  # plain safetensors, no realign
    assert set(loaded) == set(region)
    for key, mask in region.items():
        assert loaded[key].dtype == torch.bool and torch.equal(loaded[key], mask)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "realign.kind": "neurons", **meta}
    bases = {"w::safety": torch.linalg.qr(torch.randn(5, 2, generator=generator))[0], "w::utility": torch.zeros(5, 0)}
    tensors, metadata = masks.load_region(masks.save_region(tmp_path / "actsvd.safetensors", bases, "ranks"))
    assert metadata["realign.kind"] == "ranks" and tensors["w::utility"].shape == (5, 0)
    assert torch.equal(tensors["w::safety"], bases["w::safety"])


def test_removals_undo_and_random_selections_match_the_size():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=generator)
    original = weight.clone()
    mask = torch.rand(6, 5, generator=generator) > 0.6
    undo = selection.zero_masked(weight, mask)
    assert bool((weight[mask] == 0).all()) and torch.equal(weight[~mask], original[~mask])
    undo()
    assert torch.equal(weight, original)
    random_mask = selection.random_like_mask(mask, generator)
    assert random_mask.sum() == mask.sum() and not torch.equal(random_mask, mask)

    basis = selection.random_basis(6, 2, generator)
    assert torch.allclose(basis.T @ basis, torch.eye(2), atol=1e-6)
    undo = selection.remove_rank_region(weight, basis, basis)
    assert torch.allclose(weight, original - basis @ basis.T @ original, atol=1e-6)
    assert torch.allclose(basis.T @ weight, torch.zeros(2, 5), atol=1e-6), "no component left in those directions"
    undo()
    assert torch.allclose(weight, original, atol=1e-6)


def test_passes_group_whole_layers_within_the_budget(model):
    modules = neurons.find_scored_modules(model, DEFAULT_TARGET_MODULES, "weights")
    per_layer = sum(m.weight.numel() * 4 for m in modules if m.layer == 0)
    assert [len(p) for p in neurons.plan_passes(modules, lambda m: m.weight.numel() * 4, per_layer)] == [7, 7]
    assert [len(p) for p in neurons.plan_passes(modules, lambda m: m.weight.numel() * 4, 2 * per_layer)] == [14]


def test_registry_names_each_method_once_with_its_region_kind():
    assert list(selection.METHODS) == ["snip", "wanda", "set_difference", "actsvd", "lora_actsvd"]
    for method in selection.METHODS.values():
        assert method.kind in masks.KINDS and set(method.targets) <= set(neurons.TARGETS)
    assert selection.METHODS["actsvd"].uses_utility(selection.ScoreSettings(utility_rank=2))
    assert not selection.METHODS["actsvd"].uses_utility(selection.ScoreSettings(utility_rank=0))
    with pytest.raises(RealignError, match="unknown scoring method 'magnitude'"):
        selection.get_method("magnitude")


def test_kept_scores_answer_a_second_selection_without_scoring_again(model, batches, monkeypatch):
    modules = neurons.find_scored_modules(model, ["q_proj", "down_proj"], "weights")
    calls = []
    snip = selection.ELEMENTWISE_SCORES["snip"]

    def counted(*args, **kwargs):
        calls.append(1)
        return snip(*args, **kwargs)

    monkeypatch.setitem(selection.ELEMENTWISE_SCORES, "snip", counted)
    memo = selection.ScoreMemo(budget_bytes=10**9)
    kept = dict(memo=memo, memo_key="tiny|calibration", memo_origin="run-a")
    first = selection.score_region("snip", model, modules, batches, [], selection.ScoreSettings(sparsity=0.05, **kept))
    second = selection.score_region("snip", model, modules, batches, [],
                                    selection.ScoreSettings(sparsity=0.2, **{**kept, "memo_origin": "run-b"}))
    assert len(calls) == 1 and memo.hits == [("tiny|calibration|snip|safety", "run-a")]
    fresh = selection.score_region("snip", model, modules, batches, [], selection.ScoreSettings(sparsity=0.2))
    assert len(calls) == 2
    for key in fresh.tensors:
        assert torch.equal(second.tensors[key], fresh.tensors[key]), key
        assert first.selected[key] < second.selected[key]
    assert second.heads.keys() == fresh.heads.keys()

    # another key (other calibration data), or other modules under the same key, is scored again
    selection.score_region("snip", model, modules, batches, [],
                           selection.ScoreSettings(sparsity=0.2, **{**kept, "memo_key": "tiny|other"}))
    selection.score_region("snip", model, modules[:1], batches, [], selection.ScoreSettings(sparsity=0.2, **kept))
    assert len(calls) == 4 and len(memo.hits) == 1


def test_kept_scores_stay_within_their_budget(model, batches):
    modules = neurons.find_scored_modules(model, ["q_proj", "down_proj"], "weights")
    one_set = sum(m.weight.numel() * 4 for m in modules)
    memo = selection.ScoreMemo(budget_bytes=one_set - 1)
    settings = selection.ScoreSettings(sparsity=0.05, memo=memo, memo_key="big")
    selection.score_region("wanda", model, modules, batches, [], settings)
    selection.score_region("wanda", model, modules, batches, [], settings)
    assert memo.entries == {} and memo.too_big == {"big|wanda|safety"} and memo.hits == []

    memo = selection.ScoreMemo(budget_bytes=one_set)  # room for one set: the older one is dropped for the newer
    for key in ("a", "b"):
        selection.score_region("wanda", model, modules, batches, [],
                               selection.ScoreSettings(memo=memo, memo_key=key))
    assert list(memo.entries) == ["b|wanda|safety"] and memo.held_bytes() == one_set
