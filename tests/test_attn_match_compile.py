"""Ahead-of-time compilation of the attn_match_loss Triton kernels for A100 (sm_80) and H100 (sm_90), no GPU needed.

Every launch of a forward + backward of every form (``attn_match.aot_launches``: target "teacher" with its first
pass over the teacher's keys, and "mixed", forward and reverse KL, frequency mixing; the block sizes, warps and dot
precision the kernels really launch with) is compiled as training launches it: one sample of 150 images (53,590
tokens, 340 query rows; L_attn takes no token weights), the 7B student (28 / 4 heads) against the 32B teacher
(40 / 8) with fp32, fp16 and bf16 q / k inputs (the key tensors' dtype is the kernels' pointer type), and the 3B
student (16 / 2) in bf16, in a subprocess without TRITON_INTERPRET (laid_kernels.aot). ptxas must report no spill
stores or loads and no local memory; the stack frame is allowed (libdevice's accurate cos / sin keep their
argument-reduction array there), but the accurate cos / sin must be what the PTX calls.
"""

from __future__ import annotations

import pytest

from laid_kernels import aot

pytestmark = pytest.mark.skipif(aot.why_cannot_compile() is not None, reason=str(aot.why_cannot_compile()))

CASES = [((28, 4, 40, 8), "bfloat16"), ((28, 4, 40, 8), "float16"), ((28, 4, 40, 8), "float32"),
         ((16, 2, 40, 8), "bfloat16")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{h[0]}-{h[1]}-{d}" for h, d in CASES])
def compiled(request):
    # 32 compilations (16 launches x 2 archs) per case: one to several minutes each on the loaded 2-core machine
    heads, dtype = request.param
    return aot.compile_in_subprocess("laid_kernels.attn_match:aot_launches", {"heads": heads, "dtype": dtype},
                                     archs=(80, 90), timeout=1800)


FORMS = ("", "[teacher, reverse]", "[mixed, forward]", "[mixed, reverse]", "[mixed, forward, frequency]")


def test_every_launch_compiles_for_both_archs(compiled):
    """The teacher target's first pass and the three kernels of every form (target, divergence, frequency mixing)."""
    names = {(r.name, r.arch) for r in compiled}
    kernels = ["attn_match/teacher_lse"] + [f"attn_match/{k}{f}" for f in FORMS for k in ("forward", "dq", "dk")]
    assert names == {(n, a) for n in kernels for a in (80, 90)}


def test_no_register_spills(compiled):
    for r in compiled:
        assert r.registers <= 255, (r.name, r.arch, r.registers)
        assert r.spill_store_bytes == 0 and r.spill_load_bytes == 0, (
            f"{r.name} sm_{r.arch}: {r.spill_store_bytes} bytes spill stores, {r.spill_load_bytes} spill loads "
            f"({r.registers} registers, {r.num_warps} warps, {r.constexprs})")
        assert r.local_bytes == 0, (r.name, r.arch, r.local_bytes)


def test_accurate_cos_sin(compiled):
    for r in compiled:
        assert "cos.approx" not in r.ptx and "sin.approx" not in r.ptx, (r.name, r.arch)


def test_dots_are_the_decided_precision(compiled):
    """Every dot is TF32 mma (attn_match's docstring: "ieee" and "tf32x3" spill at the launched tiles), never a
    silent other precision: the constexpr and the PTX agree."""
    for r in compiled:
        assert r.constexprs["PRECISION"] == "tf32" and "mma" in r.ptx and ".tf32" in r.ptx, (r.name, r.arch)
