"""Plain-PyTorch definitions of every op: the specification each backend is tested against.

Written for clarity, not speed or memory: they materialise rotated and mixed tensors (and, for attention matching,
the logits). Differentiable by autograd. Notation and shapes follow ``shared/laid-spec.md``:

- q_s [B, N, Hs, D], k_s [B, N, Hs_kv, D]: student queries / keys before RoPE (q_proj / k_proj outputs).
- q_t [B, N, Ht, D], k_t [B, N, Ht_kv, D]: teacher queries / keys before RoPE.
- positions [3, B, N] (rows t, h, w) or [B, N] integer M-RoPE positions; inv_freq [D/2]; mrope_section (s0, s1, s2)
  with s0 + s1 + s2 = D/2.
- w_q [Hs, Ht], w_k [Hs_kv, Ht_kv]: head mixing; student head i is aligned to sum_j w_q[i, j] * teacher head j.
  qk_align_loss and attn_match_loss also take frequency mixing w_q [Hs, Ht, D/2, 2], w_k [Hs_kv, Ht_kv, D/2, 2]:
  complex weights (last axis real, imaginary) on the RoPE pair (f, f + D/2) of each head (:func:`mix_heads`).
- query_mask [B, N] bool: the query rows of attention matching; valid [B, N] bool: the attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .validation import check_apply_mrope_args, check_attn_match_args, check_qk_align_args

def mrope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                  mrope_section: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine of the M-RoPE angles, fp32, each [B, N, D/2].

    Frequency f uses position row r(f) = 0 for f < s0, 1 for f < s0 + s1, else 2, and angle
    positions[r(f)] * inv_freq[f], computed in fp32 exactly as transformers' Qwen2.5-VL rotary embedding does.
    positions: [3, B, N] integers.
    """
    s0, s1, s2 = mrope_section
    rows = torch.repeat_interleave(torch.arange(3, device=positions.device),
                                   torch.tensor([s0, s1, s2], device=positions.device))  # [D/2]
    angles = positions[rows].float().permute(1, 2, 0) * inv_freq.float()  # [B, N, D/2]
    return angles.cos(), angles.sin()


def upcast(x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """x in fp32 (the compute precision of every op), or in fp64 if x or any of ``others`` (the op's other float
    inputs) is fp64, so that gradcheck can run in double and mixed fp64 / fp32 inputs meet in one dtype."""
    double = any(t.dtype == torch.float64 for t in (x, *others))
    return x.to(torch.float64 if double else torch.float32)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [B, N, H, D] (fp32) by cos / sin [B, N, D/2]: channel f pairs with f + D/2."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_mrope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                mrope_section: Sequence[int]) -> torch.Tensor:
    """M-RoPE of x [B, N, H, D]; returns [B, N, H, D] in x's dtype, computed in fp32."""
    positions, section = check_apply_mrope_args(x, positions, inv_freq, mrope_section)
    cos, sin = mrope_cos_sin(positions, inv_freq, section)
    return rotate(upcast(x), cos, sin).to(x.dtype)


def token_weights(valid: torch.Tensor | None, token_weight: torch.Tensor | None, batch: int, seq: int,
                  device: torch.device) -> torch.Tensor:
    """Per-token weight w_n [B, N] fp32: token_weight (default 1) where valid (default everywhere), else 0."""
    weight = torch.ones(batch, seq, device=device) if token_weight is None else token_weight.float()
    return weight if valid is None else weight * valid.bool()


def mixing_statistics(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None = None,
                      frequency: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sufficient statistics of the weighted least-squares fit of the mix (fp64 / complex128, no gradient).

    student [B, N, Hs, D], teacher [B, N, Ht, D], weight [B, N] (w_n, 0 on padding; default 1). Head mixing:
    (cross [Hs, Ht] = sum_n w_n Q_s Q_t^T, gram [Ht, Ht] = sum_n w_n Q_t Q_t^T), summed over channels too.
    Frequency mixing: with z_f = x_f + i x_{f + D/2}, per frequency pair f (Hermitian transposes)
    (cross [D/2, Hs, Ht] = sum_n w_n z_s z_t^H, gram [D/2, Ht, Ht] = sum_n w_n z_t z_t^H). Rotation-invariant, so
    computed on the unrotated rows.
    """
    student, teacher = student.detach().double(), teacher.detach().double()
    if weight is not None:
        keep = weight != 0
        root = weight[keep].double().sqrt()[:, None, None]
        student, teacher = student[keep] * root, teacher[keep] * root  # [T, H, D]
    if not frequency:
        return (torch.einsum("...id,...jd->ij", student, teacher), torch.einsum("...id,...jd->ij", teacher, teacher))
    z_s = torch.complex(*student.chunk(2, dim=-1))  # [..., Hs, D/2]
    z_t = torch.complex(*teacher.chunk(2, dim=-1))
    return (torch.einsum("...if,...jf->fij", z_s, z_t.conj()), torch.einsum("...if,...jf->fij", z_t, z_t.conj()))


def fit_mixing(cross: torch.Tensor, gram: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """The ridge least-squares mix W = cross (gram + eps I)^-1 from :func:`mixing_statistics` (fp64).

    eps = ridge * mean(diag(gram)) (per frequency pair for frequency mixing): a ridge relative to the teacher's
    scale, so that the fit is well posed when teacher heads are collinear. Returns head mixing [Hs, Ht] for real
    statistics, frequency mixing [Hs, Ht, D/2, 2] (real, imaginary) for complex ones. Under normalize="student" the
    fitted mix (ridge 0) minimises L_qk, whose value is then 1 - R^2 of each head, averaged.
    """
    diagonal = gram.diagonal(dim1=-2, dim2=-1).real
    eps = ridge * diagonal.mean(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    # W (gram + eps I) = cross  <=>  (gram + eps I)^T W^T = cross^T
    solution = torch.linalg.solve((gram + eps[..., None, None] * eye).mT, cross.mT).mT
    if not solution.is_complex():
        return solution
    return torch.view_as_real(solution.permute(1, 2, 0).contiguous())  # [D/2, Hs, Ht] -> [Hs, Ht, D/2, 2]


def qk_align_loss(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                  w_q: torch.Tensor, w_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                  mrope_section: Sequence[int], *, token_weight: torch.Tensor | None = None,
                  valid: torch.Tensor | None = None, normalize: str = "student", rope: bool = True) -> torch.Tensor:
    """L_qk, the head-level Q/K alignment loss (fp32 scalar; fp64 for fp64 inputs).

    Per student head i of one side (queries: x_s = q_s, x_t = q_t, W = w_q; keys: k_s, k_t, w_k), with
    m_i = the mix of teacher heads by W (:func:`mix_heads`: head mixing W [Hs, Ht] or frequency mixing
    W [Hs, Ht, D/2, 2]) and w_n = token_weight (default 1) on valid tokens, 0 on padding:

        E_i = sum_n w_n ||R x_s,i - R m_i||^2      S_i = sum_n w_n ||x_s,i||^2      T_i = sum_n w_n ||m_i||^2

    normalize="student" (default): L = (mean_i E_i / S_i over query heads + mean_h E_h / S_h over kv heads) / 2,
    the gradient flowing through S_i too (scale-invariant: 1 - R^2 of each head at the least-squares W);
    "target": sum of E over both sides / stop-gradient sum of T; "none": sum of E / (sum_n w_n (Hs + Hs_kv) D).
    Every denominator is clamped at fp32 tiny. The teacher's q_t / k_t receive no gradient. rope=False skips the
    rotation (equal up to rounding: the rotation is orthogonal, shared by all heads of a token, and commutes with
    both mixings).
    """
    positions, section = check_qk_align_args(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq, mrope_section,
                                             token_weight, valid, normalize)
    batch, seq, hs, dim = q_s.shape
    hs_kv, device = k_s.shape[2], q_s.device
    weight = token_weights(valid, token_weight, batch, seq, device)
    cos, sin = mrope_cos_sin(positions, inv_freq, section)
    tiny = torch.finfo(torch.float32).tiny

    errors, energies, target_norms = [], [], []  # per side: [H_student] each
    for student, teacher, mixing in ((q_s, q_t, w_q), (k_s, k_t, w_k)):
        student, teacher, mixing = (upcast(x, student, teacher, mixing) for x in (student, teacher.detach(), mixing))
        side_weight = weight.to(student.dtype)[:, :, None]  # [B, N, 1]
        target = mix_heads(mixing, teacher)  # [B, N, H_student, D]
        energies.append((side_weight * student.square().sum(dim=-1)).sum(dim=(0, 1)))
        target_norms.append((side_weight * target.detach().square().sum(dim=-1)).sum(dim=(0, 1)))
        if rope:
            student, target = rotate(student, cos, sin), rotate(target, cos, sin)
        errors.append((side_weight * (student - target).square().sum(dim=-1)).sum(dim=(0, 1)))
    if normalize == "student":
        return sum((error / energy.clamp_min(tiny)).mean() for error, energy in zip(errors, energies)) / 2
    numerator = errors[0].sum() + errors[1].sum()
    if normalize == "target":
        denominator = target_norms[0].sum() + target_norms[1].sum()
    else:
        denominator = weight.sum() * (hs + hs_kv) * dim
    return numerator / denominator.clamp_min(tiny)


def distance_log_weight(distance: torch.Tensor, alpha: float, progress: float,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log omega_p(d) = alpha * p * log(1 + log2(1 + d)) for integer distances d >= 0 (same shape, ``dtype``)."""
    return (alpha * progress) * torch.log1p(torch.log2(1.0 + distance.to(dtype)))


def mix_heads(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_j w[i, j] x[..., j, :]: x [..., H_in, D] -> [..., H_out, D] in x's dtype.

    w: head mixing [H_out, H_in], or frequency mixing [H_out, H_in, D/2, 2]: channels (f, f + D/2) of a head are
    the real and imaginary part of z_f, and the mix is sum_j C[i, j, f] z_j,f with C = w[..., 0] + i w[..., 1].
    Both commute with the rotation R (a complex product commutes with a rotation of its plane).
    """
    if w.dim() == 2:
        return torch.einsum("ij,...jd->...id", w, x)
    real, imag = w[..., 0], w[..., 1]  # [H_out, H_in, D/2]
    x1, x2 = x.chunk(2, dim=-1)
    y1 = torch.einsum("ijf,...jf->...if", real, x1) - torch.einsum("ijf,...jf->...if", imag, x2)
    y2 = torch.einsum("ijf,...jf->...if", real, x2) + torch.einsum("ijf,...jf->...if", imag, x1)
    return torch.cat((y1, y2), dim=-1)


def attention_mixture(w_q: torch.Tensor) -> torch.Tensor:
    """pi [Hs, Ht] = w_q[i, j]^2 / sum_j' w_q[i, j']^2 (frequency mixing [Hs, Ht, D/2, 2]: the energy
    sum_f |C[i, j, f]|^2 in place of w_q[i, j]^2), in w_q's dtype: the weight of teacher head j's attention in
    student head i's target under target="teacher". Each row sums to 1."""
    energy = w_q.square() if w_q.dim() == 2 else w_q.square().sum(dim=(2, 3))
    return energy / energy.sum(dim=1, keepdim=True)


def attn_match_loss(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                    w_q: torch.Tensor, w_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                    mrope_section: Sequence[int], query_mask: torch.Tensor, *, progress: float, alpha: float = 1.0,
                    valid: torch.Tensor | None = None, target: str = "teacher",
                    divergence: str = "forward") -> torch.Tensor:
    """L_attn, progressive distance-weighted attention matching (fp32 scalar; fp64 for fp64 inputs); materialises
    the logits.

    For every sample b, selected valid query row m (query_mask & valid) and student head i, over the keys n <= m
    that are valid in sample b, with d = m - n:

        s_s(m, n) = (R q_s,i(m)) . (R k_s,g(i)(n)) / sqrt(D),  g(i) = i // (Hs / Hs_kv),  p_s = softmax_n s_s
        target="teacher": pbar_i = sum_j pi[i, j] softmax_n((R q_t,j(m)) . (R k_t,j // (Ht / Ht_kv)(n)) / sqrt(D))
                          with pi = attention_mixture(w_q)
        target="mixed":   pbar_i = softmax_n((mix(w_q) R q_t)_i(m) . (mix(w_k) R k_t)_g(i)(n) / sqrt(D))
        phat_i(n) = omega_p(d) pbar_i(n) / sum_n' omega_p(d') pbar_i(n'),  log omega_p(d) = distance_log_weight
        divergence="forward": KL(phat || p_s) = sum_n phat (log phat - log p_s)
        divergence="reverse": KL(p_s || phat) = sum_n p_s (log p_s - log phat)
        L = mean over (b, m, i) of the KL

    mix is ``mix_heads`` (head or frequency mixing). Selected rows that are padding (valid False) are ignored. The
    teacher side (q_t, k_t, w_q, w_k) is a target: no gradient flows into it. Memory: logits [Hs (and Ht), rows of
    a sample, N] per sample, plus rotated copies of all inputs.
    """
    positions, section, rows = check_attn_match_args(q_s, k_s, q_t, k_t, w_q, w_k, positions, inv_freq,
                                                     mrope_section, query_mask, valid, progress, alpha, target,
                                                     divergence)
    batch, seq, hs, dim = q_s.shape
    group = hs // k_s.shape[2]
    key_valid = torch.ones(batch, seq, dtype=torch.bool, device=q_s.device) if valid is None else valid.bool()
    cos, sin = mrope_cos_sin(positions, inv_freq, section)
    inputs = (q_s, k_s, q_t, k_t, w_q, w_k)
    student_q = rotate(upcast(q_s, *inputs), cos, sin)  # [B, N, Hs, D]
    student_k = rotate(upcast(k_s, *inputs), cos, sin).repeat_interleave(group, dim=2)  # [B, N, Hs, D]
    teacher_q = rotate(upcast(q_t.detach(), *inputs), cos, sin)  # [B, N, Ht, D]
    teacher_k = rotate(upcast(k_t.detach(), *inputs), cos, sin)  # [B, N, Ht_kv, D]
    if target == "teacher":
        mixture = attention_mixture(upcast(w_q.detach(), *inputs))  # [Hs, Ht]
        teacher_k = teacher_k.repeat_interleave(q_t.shape[2] // k_t.shape[2], dim=2)  # [B, N, Ht, D]
    else:
        teacher_q = mix_heads(upcast(w_q.detach(), *inputs), teacher_q)  # [B, N, Hs, D]
        teacher_k = mix_heads(upcast(w_k.detach(), *inputs), teacher_k).repeat_interleave(group, dim=2)

    total = torch.zeros((), device=q_s.device)
    for b in range(batch):
        m = rows[b].nonzero().squeeze(1)  # [R_b] query rows of this sample
        if m.numel() == 0:
            continue
        n = torch.arange(seq, device=q_s.device)
        allowed = (n[None, :] <= m[:, None]) & key_valid[b][None, :]  # [R_b, N]
        distance = (m[:, None] - n[None, :]).clamp_min(0)
        logits_s = torch.einsum("rid,nid->irn", student_q[b, m], student_k[b]) / dim ** 0.5  # [Hs, R_b, N]
        logits_t = torch.einsum("rid,nid->irn", teacher_q[b, m], teacher_k[b]) / dim ** 0.5  # [Ht or Hs, R_b, N]
        log_p_s = torch.log_softmax(logits_s.masked_fill(~allowed, float("-inf")), dim=-1)
        log_p_t = torch.log_softmax(logits_t.masked_fill(~allowed, float("-inf")), dim=-1)
        if target == "teacher":
            log_p_t = torch.einsum("ij,jrn->irn", mixture, log_p_t.exp()).log()  # log pbar [Hs, R_b, N]
        log_phat = torch.log_softmax(log_p_t + distance_log_weight(distance, alpha, progress, log_p_t.dtype), dim=-1)
        if divergence == "forward":
            kl = torch.where(log_phat > float("-inf"), log_phat.exp() * (log_phat - log_p_s), 0.0)
        else:
            kl = log_p_s.exp() * torch.where(allowed, log_p_s - log_phat, 0.0)  # (no NaN gradient where blocked)
        total = total + kl.sum(dim=-1).sum()  # KL per (head, row), summed
    return total / (rows.sum() * hs)
