"""HeadMixer: the gain starts at exactly 1, the three initialisations, persistence, and folding into q_proj."""

import torch

from laid.mixer import HeadMixer, fold_gain


def mixer(pairs=2):
    return HeadMixer(pairs, student_heads=4, student_kv_heads=2, teacher_heads=6, teacher_kv_heads=3, head_dim=8)


def test_gain_starts_at_one_and_pairs_channels():
    m = mixer()
    assert torch.allclose(m.gain(0), torch.ones(4, 4), atol=1e-7, rtol=0)
    with torch.no_grad():
        m.gain_raw[1, 2, 3] = 2.0
    channels = m.gain_channels(1)
    assert channels.shape == (4, 8) and channels[2, 3] == channels[2, 7] > 1 and channels[2, 2] == channels[2, 6]


def test_uniform_and_nearest():
    m = mixer()
    m.init_nearest()
    assert torch.equal(m.w_q[0].argmax(-1), torch.tensor([0, 1, 3, 4])) and torch.equal(m.w_q.sum(-1), torch.ones(2, 4))
    assert torch.equal(m.w_k[1].argmax(-1), torch.tensor([0, 1]))
    m.init_uniform()
    assert torch.allclose(m.w_q, torch.full_like(m.w_q, 1 / 6)) and torch.allclose(m.w_k, torch.full_like(m.w_k, 1 / 3))


def test_best_teacher_heads_pick_the_largest_mixture_weight():
    """Head mixing: the largest |w_q[i, j]| (sign ignored: pi is w_q^2); frequency mixing: the largest energy
    summed over frequency pairs and real / imaginary parts, which a single large entry does not decide."""
    m = mixer(pairs=2)
    with torch.no_grad():
        m.w_q[1] = torch.tensor([[0.1, -0.9, 0.2, 0.0, 0.0, 0.3],
                                 [0.5, 0.1, 0.1, 0.1, 0.1, 0.1],
                                 [0.0, 0.0, 0.0, 0.0, 0.0, -2.0],
                                 [0.2, 0.2, 0.3, -0.31, 0.0, 0.0]])
    best = m.best_teacher_heads(1)
    assert torch.equal(best, torch.eye(6)[[1, 0, 5, 3]]) and best.dtype == m.w_q.dtype
    f = HeadMixer(1, student_heads=2, student_kv_heads=1, teacher_heads=3, teacher_kv_heads=1, head_dim=8,
                  mixing="frequency")
    with torch.no_grad():
        f.w_q.zero_()
        f.w_q[0, 0, 0, 0, 0] = 1.5  # one large weight: energy 2.25
        f.w_q[0, 0, 1, :, 1] = 0.8  # four smaller imaginary weights: energy 2.56
        f.w_q[0, 1, 2, 3, 0] = 0.1
    assert torch.equal(f.best_teacher_heads(0), torch.eye(3)[[1, 2]])


def test_lstsq_recovers_a_linear_mix_and_ignores_padding():
    torch.manual_seed(0)
    m = mixer(pairs=1)
    q_t, k_t = torch.randn(2, 40, 6, 8), torch.randn(2, 40, 3, 8)
    w_q, w_k = torch.randn(4, 6), torch.randn(2, 3)
    q_s, k_s = torch.einsum("ij,bnjd->bnid", w_q, q_t), torch.einsum("ij,bnjd->bnid", w_k, k_t)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 30:] = False
    q_s[1, 30:] = 1e3  # padding garbage must not enter the fit
    m.init_lstsq(0, m.lstsq_statistics(q_s, q_t, valid), m.lstsq_statistics(k_s, k_t, valid),
                 ridge=1e-9)
    assert torch.allclose(m.w_q[0], w_q, atol=1e-4) and torch.allclose(m.w_k[0], w_k, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    m = mixer()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    m.save(tmp_path / "mixer.safetensors")
    loaded = HeadMixer.load(tmp_path / "mixer.safetensors")
    for name, p in m.named_parameters():
        assert torch.equal(p, dict(loaded.named_parameters())[name])


def test_fold_gain_equals_scaling_the_output():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 4 * 8)
    gain = torch.rand(4, 8) + 0.5
    x = torch.randn(3, 16)
    expected = (linear(x).view(3, 4, 8) * gain).view(3, 32)
    weight, bias = fold_gain(linear.weight, linear.bias, gain)
    assert torch.allclose(torch.nn.functional.linear(x, weight, bias), expected, atol=1e-6)


def test_frequency_mixing_parameters_and_real_initialisations():
    m = HeadMixer(2, 4, 2, 6, 3, head_dim=8, mixing="frequency")
    assert m.w_q.shape == (2, 4, 6, 4, 2) and m.w_k.shape == (2, 2, 3, 4, 2)
    assert torch.allclose(m.w_q[..., 0], torch.full((2, 4, 6, 4), 1 / 6)) and torch.all(m.w_q[..., 1] == 0)
    m.init_nearest()
    assert torch.equal(m.w_q[0, :, :, 2, 0].argmax(-1), torch.tensor([0, 1, 3, 4])) and torch.all(m.w_k[..., 1] == 0)


def test_frequency_lstsq_recovers_a_complex_mix_per_frequency_pair():
    """The complex ridge fit per frequency pair (Hermitian transposes) recovers C exactly from mixed teacher rows, and
    at the fit L_qk under normalize="student" is minimal: 0 here, where head mixing cannot explain the rows."""
    from laid_kernels import qk_align_loss, reference

    torch.manual_seed(0)
    m = HeadMixer(1, 4, 2, 6, 3, head_dim=8, mixing="frequency")
    q_t, k_t = torch.randn(2, 40, 6, 8), torch.randn(2, 40, 3, 8)
    c_q, c_k = torch.randn(4, 6, 4, 2), torch.randn(2, 3, 4, 2)
    q_s, k_s = reference.mix_heads(c_q, q_t), reference.mix_heads(c_k, k_t)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 30:] = False
    q_s[1, 30:] = 1e3  # padding garbage must not enter the fit
    m.init_lstsq(0, m.lstsq_statistics(q_s, q_t, valid), m.lstsq_statistics(k_s, k_t, valid), ridge=1e-9)
    assert torch.allclose(m.w_q[0], c_q, atol=1e-4) and torch.allclose(m.w_k[0], c_k, atol=1e-4)
    positions, inv_freq = torch.arange(40).repeat(3, 2, 1), torch.rand(4)
    args = (q_s, k_s, q_t, k_t)
    loss = qk_align_loss(*args, m.w_q[0], m.w_k[0], positions, inv_freq, (2, 1, 1), valid=valid, backend="reference")
    head = HeadMixer(1, 4, 2, 6, 3, head_dim=8)
    head.init_lstsq(0, head.lstsq_statistics(q_s, q_t, valid), head.lstsq_statistics(k_s, k_t, valid), ridge=1e-9)
    head_loss = qk_align_loss(*args, head.w_q[0], head.w_k[0], positions, inv_freq, (2, 1, 1), valid=valid,
                              backend="reference")
    assert loss < 1e-8 and head_loss > 0.1


def test_frequency_mixer_save_load_round_trip(tmp_path):
    m = HeadMixer(1, 4, 2, 6, 3, head_dim=8, mixing="frequency")
    with torch.no_grad():
        m.w_q.normal_()
    m.save(tmp_path / "mixer.safetensors")
    loaded = HeadMixer.load(tmp_path / "mixer.safetensors")
    assert loaded.mixing == "frequency" and torch.equal(loaded.w_q, m.w_q)
