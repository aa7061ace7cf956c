"""Tests for `laid analyze` (laid.analyze, laid.attention_stats, laid.rope_spectrum, laid.head_flow,
laid.analysis_figures): the streamed attention statistics equal the model's own dense attention, the spectrum of a
one-pair head, the head-flow R^2 of a student identical to its teacher (both mixing shapes), the command end to end
on tiny models, and clear errors."""

import json
import math
import shutil

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from laid.analysis_figures import bin_labels, ranked_heads, slug
from laid.analyze import analyze, capture_qk, haystack_prompt, profile, resolve_model, size_entries
from laid.attention_stats import attention_row_stats, distance_bin_edges, uniform_distance
from laid.cli import main
from laid.data import synth_benchmark
from laid.head_flow import explained_share, load_mixing, mix, pair_weights
from laid.mixer import HeadMixer
from laid.prompt_inputs import model_inputs
from laid.rope_spectrum import low_frequency_pairs, low_frequency_share, pair_shares
from laid.tiny import TINY_STUDENT, TINY_TEACHER, save_tiny_model, save_tiny_processor, tiny_qwen25vl_config
from laid_kernels import reference

SIZES = (1, 3)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny teacher and student (no processor in their folders), the processor apart, a 1- and 3-image benchmark,
    and a LAid-style run folder whose student is the teacher itself with an identity head mixing."""
    root = tmp_path_factory.mktemp("analyze")
    save_tiny_processor(root / "processor")
    save_tiny_model(root / "teacher", tiny_qwen25vl_config(**TINY_TEACHER), seed=0)
    save_tiny_model(root / "student", tiny_qwen25vl_config(**TINY_STUDENT), seed=1)
    shutil.copytree(root / "teacher", root / "run" / "final")
    heads, kv_heads, layers = TINY_TEACHER["heads"], TINY_TEACHER["kv_heads"], TINY_TEACHER["layers"]
    mixer = HeadMixer(pairs=1, student_heads=heads, student_kv_heads=kv_heads, teacher_heads=heads,
                      teacher_kv_heads=kv_heads, head_dim=TINY_TEACHER["head_dim"])
    mixer.init_nearest()  # Hs == Ht: the identity
    mixer.save(root / "run" / "final" / "mixer.safetensors")
    summary = {"student_layers": [layers - 1], "config": {"teacher": str(root / "teacher"), "layer_pairs": [[-1, -1]]}}
    (root / "run" / "final" / "summary.json").write_text(json.dumps(summary))
    synth_benchmark(root / "vhs", sizes=SIZES, n_entries=2, image_size=56, seed=0)
    return root


def _dense_stats(attention: torch.Tensor, rows: torch.Tensor, needle: torch.Tensor, image: torch.Tensor):
    """Distance histogram [R, H, bins], reach [R, H] and needle share of the last row [H] from a dense attention
    matrix [H, N, N] (the model's own, eager)."""
    heads, seq, _ = attention.shape
    p = attention[:, rows].transpose(0, 1)  # [R, H, N]
    distance = (rows[:, None] - torch.arange(seq)[None, :]).clamp_min(0)
    bins = torch.where(distance == 0, 0, torch.floor(torch.log2(distance.clamp_min(1).double())).long() + 1)
    histogram = torch.zeros(len(rows), heads, int(bins.max()) + 1, dtype=p.dtype)
    histogram.scatter_add_(2, bins[:, None, :].expand_as(p), p)
    reach = (p * torch.log2(1.0 + distance.float())[:, None, :]).sum(-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return histogram, reach, entropy, p[-1][:, needle].sum(-1) / p[-1][:, image].sum(-1)


def test_streamed_attention_by_distance_equals_the_models_dense_attention(family):
    """Blocks of 7 keys (several blocks, a ragged last one) rebuild what the model computes: the eager attention
    matrix of every layer, with GQA, M-RoPE over 3 images and the causal mask."""
    processor = AutoProcessor.from_pretrained(family / "processor")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(family / "teacher", attn_implementation="eager").eval()
    entry = json.loads((family / "vhs" / "visual_haystack_3.json").read_text())[0]
    inputs, needle, image = haystack_prompt(processor, entry, 0, 3, family / "vhs", seed=0)
    with torch.no_grad():
        attentions = model(**model_inputs(inputs, "cpu"), output_attentions=True).attentions  # layers x [1, H, N, N]
    queries, keys, positions = capture_qk(model, list(range(len(attentions))), inputs)
    rows = torch.arange(int(image.nonzero().max()) + 1, len(image))
    rotary = model.model.language_model.rotary_emb
    assert 0 < needle.sum() < image.sum() and len(rows) > 5
    profiled = {"distance": [], "needle": [], "entropy": []}
    for layer, dense in enumerate(attentions):
        stats = attention_row_stats(queries[layer], keys[layer], positions, rows, rotary.inv_freq,
                                    rotary.mrope_section, groups=(needle, image), block=7)
        histogram, reach, entropy, needle_share = _dense_stats(dense[0], rows, needle, image)
        torch.testing.assert_close(stats.distance, histogram, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(stats.distance.sum(-1), torch.ones(len(rows), dense.shape[1]))  # shares sum to 1
        torch.testing.assert_close(stats.reach, reach, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(stats.entropy, entropy, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(stats.groups[0, -1] / stats.groups[1, -1], needle_share, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(stats.groups[1], dense[0][:, rows][..., image].sum(-1).T, atol=1e-5, rtol=1e-4)
        # The spectrum: sum_n p |c_f| with c_f from the reference rotation; sum_f c_f is the logit.
        q = reference.apply_mrope(queries[layer][None, rows].float(), positions[:, None, rows], rotary.inv_freq,
                                  rotary.mrope_section)[0]
        k = reference.apply_mrope(keys[layer][None].float(), positions[:, None], rotary.inv_freq,
                                  rotary.mrope_section)[0].repeat_interleave(q.shape[1] // keys[layer].shape[1], 1)
        half = q.shape[-1] // 2
        parts = (q[:, None, :, :half] * k[None, :, :, :half] + q[:, None, :, half:] * k[None, :, :, half:])
        parts = parts.permute(0, 2, 1, 3) / math.sqrt(q.shape[-1])  # [R, H, N, D/2]
        p = dense[0][:, rows].transpose(0, 1)
        torch.testing.assert_close(stats.spectrum, torch.einsum("rhn,rhnf->rhf", p, parts.abs()), atol=1e-5, rtol=1e-4)
        profiled["distance"].append(histogram.mean(0))
        profiled["needle"].append(needle_share)
        profiled["entropy"].append(entropy.mean(0))
    # The chance reference: attention spread evenly over each row's causal keys.
    even = torch.ones(1, len(image), len(image)).tril()
    torch.testing.assert_close(uniform_distance(rows), _dense_stats(even / even.sum(-1, keepdim=True), rows, needle,
                                                                    image)[0][:, 0])
    # profile() reduces the same statistics over the question rows of its prompts (here one).
    result = profile(model, {3: [(inputs, needle, image)]}, block=7)[3]
    torch.testing.assert_close(result["distance"], torch.stack(profiled["distance"]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result["needle"], torch.stack(profiled["needle"]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result["entropy"], torch.stack(profiled["entropy"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result["uniform"], uniform_distance(rows).mean(0))
    assert result["tokens"] == len(image) and result["span"] == int((positions.amax(-1) - positions.amin(-1)).max())
    # needle_any: per prompt the best head of each layer, then the mean over prompts (not the best per-head mean).
    other = haystack_prompt(processor, json.loads((family / "vhs" / "visual_haystack_3.json").read_text())[1], 1, 3,
                            family / "vhs", seed=0)
    both = profile(model, {3: [(inputs, needle, image), other]}, block=7)[3]
    second = profile(model, {3: [other]}, block=7)[3]
    torch.testing.assert_close(result["needle_any"], result["needle"].amax(-1))
    torch.testing.assert_close(both["needle_any"], (result["needle"].amax(-1) + second["needle"].amax(-1)) / 2)
    torch.testing.assert_close(both["needle"], (result["needle"] + second["needle"]) / 2)
    assert (both["needle_any"] > both["needle"].amax(-1) + 1e-3).any()  # another head is best in the other prompt
    # Two forwards (layers 0-1, then 2) give the same numbers as one that holds every layer.
    split = profile(model, {3: [(inputs, needle, image)]}, block=7, layers_per_pass=2)[3]
    for key in ("distance", "reach", "needle", "needle_any", "spectrum"):
        torch.testing.assert_close(split[key], result[key])
    with pytest.raises(ValueError, match="layers_per_pass must be >= 1"):
        profile(model, {}, layers_per_pass=-1)


def test_distance_bins_are_log2_and_labelled():
    edges = distance_bin_edges(9)
    assert edges.tolist() == [1, 2, 4, 8]
    d = torch.tensor([0, 1, 2, 3, 4, 7, 8, 9])
    assert torch.bucketize(d, edges, right=True).tolist() == [0, 1, 2, 2, 3, 3, 4, 4]
    assert bin_labels(5) == ["0", "1", "2-3", "4-7", "8-15"]
    assert slug("LAid w/o L_qk (seed 0)") == "laid_w_o_l_qk_seed_0" and slug("Base student") == "base_student"
    best, median = ranked_heads(torch.tensor([[0.5, 3.0, 1.0, 2.0], [4.0, 1.0, 2.0, 3.0]]))
    assert best.tolist() == [1, 0] and median.tolist() == [2, 2]  # the lower median of an even count


def test_spectrum_of_a_head_in_one_frequency_pair_is_all_there():
    """Head 0's q and k live only in pair 2 (channels 2 and 2 + D/2): all its spectrum is on pair 2; head 1 (dense)
    spreads over every pair."""
    torch.manual_seed(0)
    seq, dim, pair = 40, 16, 2
    queries, keys = torch.randn(seq, 2, dim), torch.randn(seq, 1, dim)
    keep = torch.zeros(dim, dtype=torch.bool)
    keep[[pair, pair + dim // 2]] = True
    queries[:, 0, ~keep] = 0
    keys_one = keys.clone()
    keys_one[:, 0, ~keep] = 0
    inv_freq = 1.0 / 1e4 ** (torch.arange(0, dim, 2).float() / dim)
    positions = torch.arange(seq)[None].expand(3, -1)
    rows = torch.arange(30, seq)
    one = pair_shares(attention_row_stats(queries, keys_one, positions, rows, inv_freq, (2, 3, 3), block=16).spectrum)
    expected = torch.zeros(dim // 2)
    expected[pair] = 1
    torch.testing.assert_close(one[:, 0], expected.expand(len(rows), -1))
    dense = pair_shares(attention_row_stats(queries, keys, positions, rows, inv_freq, (2, 3, 3)).spectrum)[:, 1]
    assert (dense.mean(0) > 0.03).all() and torch.allclose(dense.sum(-1), torch.ones(len(rows)))
    low = low_frequency_pairs(inv_freq, span=seq)
    assert low.tolist() == [bool(2 * math.pi / w > seq) for w in inv_freq.tolist()] and 0 < low.sum() < dim // 2
    assert float(low_frequency_share(expected, low)) == float(low[pair])
    with pytest.raises(ValueError, match="span"):
        low_frequency_pairs(inv_freq, span=0)
    with pytest.raises(ValueError, match="N and D must match"):
        attention_row_stats(queries[rows], keys, positions, rows, inv_freq, (2, 3, 3))
    with pytest.raises(ValueError, match="block must be >= 1"):
        attention_row_stats(queries, keys, positions, rows, inv_freq, (2, 3, 3), block=0)


@pytest.mark.parametrize("frequency_mixing", [False, True])
def test_head_flow_r2_of_a_student_identical_to_the_teacher_is_one(frequency_mixing):
    torch.manual_seed(0)
    heads, dim = 4, 8
    teacher = torch.randn(50, heads, dim)
    if frequency_mixing:  # C[i, j, f] = 1 + 0i for i = j: the identity, [Hs, Ht, D/2, 2]
        w = torch.zeros(heads, heads, dim // 2, 2)
        w[torch.arange(heads), torch.arange(heads), :, 0] = 1
        assert torch.equal(pair_weights(w), torch.eye(heads) * dim // 2)
        assert torch.equal(pair_weights(2 * w.flip(-1)), torch.eye(heads) * 2 * dim)  # C = 2i: |C|^2 = 4
    else:
        w = torch.eye(heads)
        assert torch.equal(pair_weights(w), w)
    torch.testing.assert_close(mix(teacher, w), teacher)
    torch.testing.assert_close(explained_share(teacher, teacher, w), torch.ones(heads))
    assert (explained_share(torch.randn(50, heads, dim), teacher, w) < 0.1).all()  # an unrelated student: no
    small = teacher * 1e-3  # R^2 is scale-free: a tiny student and teacher give the same shares
    half = explained_share(small + torch.randn(50, heads, dim) * small.norm(dim=-1, keepdim=True) / dim ** 0.5,
                           small, w)
    assert ((half > 0.35) & (half < 0.65)).all()  # equal energy of signal and noise: R^2 about 1 / 2
    if frequency_mixing:  # a complex scale e^{i a} on pair f is undone by mixing with e^{-i a}
        angle = torch.rand(dim // 2) * 6
        z = torch.polar(torch.ones(dim // 2), angle)
        turned = torch.view_as_real(torch.complex(teacher[..., : dim // 2], teacher[..., dim // 2:]) * z)
        student = torch.cat((turned[..., 0], turned[..., 1]), -1)
        w[torch.arange(heads), torch.arange(heads)] = torch.view_as_real(z)
        torch.testing.assert_close(explained_share(student, teacher, w), torch.ones(heads))
    with pytest.raises(ValueError, match="mixing weight must be"):
        pair_weights(torch.zeros(2, 2, 3))


def test_analyze_command_writes_every_figure_and_the_page(family, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["analyze", str(family / "teacher"), str(family / "student"), str(family / "run"), "--processor",
                 str(family / "processor"), "--data", str(family / "vhs"), "--sizes", *map(str, SIZES),
                 "--questions", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip().endswith("analysis.md")
    names = ("teacher", "student", "run")
    for stem in [f"distance_{n}" for n in names] + ["needle", "spectrum", "flow_run"]:
        assert (out / f"{stem}.png").stat().st_size > 1000 and (out / f"{stem}.json").is_file(), stem
    assert not (out / "flow_teacher.png").exists()  # plain models have no head flow
    page = (out / "analysis.md").read_text()
    for figure in ["distance_teacher.png", "distance_student.png", "distance_run.png", "needle.png", "spectrum.png",
                   "flow_run.png"]:
        assert f"]({figure})" in page
    summary = json.loads((out / "analysis.json").read_text())["models"]
    assert summary["run"]["flow"][0]["r2_q"] == pytest.approx(1.0, abs=1e-4)  # the student is its teacher
    assert summary["run"]["flow"][0]["r2_k"] == pytest.approx(1.0, abs=1e-4)
    assert summary["run"]["sizes"] == summary["teacher"]["sizes"]  # the same model, the same numbers
    assert summary["student"]["sizes"]["1"]["needle_best_head"] == pytest.approx(1.0)  # one image: all on it
    assert summary["student"]["sizes"]["1"]["needle_any_head"] == pytest.approx(1.0)
    distance = json.loads((out / "distance_student.json").read_text())["sizes"]
    for size in map(str, SIZES):
        torch.testing.assert_close(torch.tensor(distance[size]["distance"], dtype=torch.float64).sum(-1),
                                   torch.ones(TINY_STUDENT["layers"], TINY_STUDENT["heads"], dtype=torch.float64),
                                   atol=1e-3, rtol=0)
    spectrum = json.loads((out / "spectrum.json").read_text())["models"][1]
    assert len(spectrum["low_frequency_pairs"]) == TINY_STUDENT["head_dim"] // 2
    flow = json.loads((out / "flow_run.json").read_text())["pairs"][0]
    assert flow["w_q"] == torch.eye(TINY_TEACHER["heads"]).tolist()


def test_analyze_errors_name_the_argument(family, tmp_path, capsys):
    common = dict(data=family / "vhs", out_dir=tmp_path / "out", processor=family / "processor")
    for sizes in ([], [0], [1, 1]):
        with pytest.raises(ValueError, match="sizes must be"):
            analyze([family / "student"], sizes=sizes, **common)
    with pytest.raises(FileNotFoundError, match=r"size 7: .*visual_haystack_7\.json"):
        analyze([family / "student"], sizes=[7], **common)
    one_file = family / "vhs" / "visual_haystack_3.json"  # --data may be one JSON file: sizes up to its images
    assert len(size_entries(one_file, 3)) == len(size_entries(one_file, 2)) == 2
    with pytest.raises(ValueError, match="sizes: .* entry 0 has fewer than 4 images"):
        analyze([family / "student"], sizes=[4], **{**common, "data": one_file})
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        analyze([tmp_path], sizes=[1], **common)
    with pytest.raises(ValueError, match="names must be distinct"):
        analyze([family / "student", family / "student"], sizes=[1], **common)
    with pytest.raises(FileNotFoundError, match="mixer: no mixer.safetensors"):
        load_mixing(family / "student")
    assert resolve_model(family / "run") == {"name": "run", "model": family / "run" / "final",
                                             "run": family / "run" / "final"}
    # A model folder without a processor and no --processor: exit status 2, the message names --processor.
    assert main(["analyze", str(family / "student"), "--data", str(family / "vhs"), "--sizes", "1",
                 "--out", str(tmp_path / "out")]) == 2
    assert "holds no processor; pass --processor" in capsys.readouterr().err
