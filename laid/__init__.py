"""laid: LAid (Long-window Anchoring distillation) of Qwen2.5-VL models: data, trainer, evaluation and CLI.

Modules: ``laid.tiny`` (offline tiny Qwen2.5-VL checkpoints), ``laid.data`` (Visual Haystacks data), ``laid.cli``.
"""
