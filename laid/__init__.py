"""laid: LAid (Long-window Anchoring distillation) of Qwen2.5-VL models: data, trainer, evaluation and CLI.

Modules: ``laid.tiny`` (offline tiny Qwen2.5-VL checkpoints), ``laid.data`` (Visual Haystacks data), ``laid.cli``;
the trainer: ``laid.config`` (LAidConfig), ``laid.models`` (loading), ``laid.capture`` (Q/K hooks, gain, positions),
``laid.mixer`` (HeadMixer), ``laid.losses`` (the four terms), ``laid.trainer`` (the loop, ``laid.train``),
``laid.checkpoint`` (save, resume, export); evaluation: ``laid.evaluate`` (Visual Haystacks, ``laid.evaluate``),
``laid.baselines`` (YaRN, SelfExtend), ``laid.report`` (the paper-style table and plot); analysis: ``laid.analyze``
(``laid analyze``, ``laid.analyze``) with ``laid.attention_stats``, ``laid.rope_spectrum``, ``laid.head_flow`` and
``laid.analysis_figures``.
"""

__version__ = "0.1.0"

from .analyze import analyze
from .config import LAidConfig
from .evaluate import evaluate
from .mixer import HeadMixer
from .trainer import train

__all__ = ["LAidConfig", "HeadMixer", "train", "evaluate", "analyze", "__version__"]
