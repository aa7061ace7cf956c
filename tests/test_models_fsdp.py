"""The FSDP2-sharded teacher (``laid.models.shard_teacher``) computes what the whole teacher computes, with rank 1
loading no weights (rank-0-only loading and broadcast): two CPU processes (gloo) under torchrun. The student's FSDP
path is tests/test_train_fsdp.py."""

import shutil
import subprocess
from pathlib import Path

import pytest

from laid.tiny import TINY_TEACHER, save_tiny_model, tiny_qwen25vl_config
from train_helpers import free_port, subprocess_env

TESTS = Path(__file__).parent


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_sharded_teacher_matches_the_whole_teacher(tmp_path):
    save_tiny_model(tmp_path / "teacher", tiny_qwen25vl_config(**TINY_TEACHER), seed=0)
    result = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
                             str(TESTS / "fsdp_teacher_script.py"), str(tmp_path / "teacher")],
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ok 0" in result.stdout and "ok 1" in result.stdout
