"""The LAid objective for one batch (shared/laid-spec.md):

    L = lambda_laid * (L_qk + beta * L_attn) + lambda_kl * L_KL + lambda_sft * L_SFT

:class:`LAidObjective` runs the frozen teacher (no gradient; stopped right after its last aligned layer when
lambda_kl = 0) and the student with :class:`laid.capture.QKCapture` hooks on the aligned layers, then computes

- L_qk: ``laid_kernels.qk_align_loss`` per aligned pair (mean over pairs) with ``qk_normalize`` ("student": the
  unexplained share of the student's Q/K energy) and the mixer's head or frequency mixing, weighted by ``qk_weight``
  (1; 0 ablates it and skips it);
- L_attn: ``laid_kernels.attn_match_loss`` per pair with progress p = step / total steps (mean over pairs), with
  ``config.attn_target`` / ``attn_divergence``, the query rows of ``config.attn_rows`` (:func:`attention_rows`) and,
  with ``attn_heads="best"``, one teacher head per student head (``HeadMixer.best_teacher_heads``) as the target;
- L_KL: tau^2 KL(teacher || student) at the answer positions, both logit vectors cut to the shared tokenizer
  vocabulary first, so models with different (padded) vocabulary sizes work together;
- L_SFT: cross-entropy on the answer tokens.

Logits are computed only at answer positions (``logits_to_keep``): never [B, N, V].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import laid_kernels

from .capture import QKCapture, decoder_layers, mrope_positions, resolve_layer, stop_after, unwrap
from .config import LAidConfig
from .mixer import HeadMixer
from .models import check_compatible

IGNORE_INDEX = -100
_NO_POSITIONS = torch.zeros(0, dtype=torch.long)  # logits_to_keep of a forward whose logits are not needed


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where logits are needed: position n predicts labels[:, n + 1].

    labels [B, N] (IGNORE_INDEX except the answer). Returns keep [K] (positions needed by any sample, sorted, for
    ``logits_to_keep``), select [B, K] bool (which of them are supervised in each sample) and targets [B, K].
    """
    supervised = labels[:, 1:] != IGNORE_INDEX  # [B, N-1]
    keep = supervised.any(dim=0).nonzero().squeeze(-1)
    if keep.numel() == 0:
        raise ValueError("labels: the batch has no supervised (answer) token; every label is -100")
    return keep, supervised[:, keep], labels[:, keep + 1]


def attention_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int,
                   rows: str) -> torch.Tensor:
    """The query rows of L_attn, bool [B, N], for ``LAidConfig.attn_rows``.

    input_ids, attention_mask: [B, N]. "text": every valid token that is not an image pad token (delimiters and
    all text, before and after the images). "after_images": the valid tokens after the last image pad token of each
    sample (the question and the answer position); a sample without images keeps all its valid tokens.
    """
    valid = attention_mask.bool()
    is_image = input_ids == image_token_id
    if rows == "text":
        return valid & ~is_image
    if rows != "after_images":
        raise ValueError(f"attn_rows must be 'text' or 'after_images', got {rows!r}")
    index = torch.arange(input_ids.shape[1], device=input_ids.device)
    last_image = torch.where(is_image, index, -1).amax(dim=1)  # [B], -1 without images
    return valid & (index[None, :] > last_image[:, None])


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab: int, tau: float) -> torch.Tensor:
    """tau^2 KL(softmax(z_t / tau) || softmax(z_s / tau)) averaged over tokens, on the first ``vocab`` logits.

    student_logits [T, Vs], teacher_logits [T, Vt] with Vs, Vt >= vocab (padded vocabularies are cut).
    """
    student = F.log_softmax(student_logits[..., :vocab].float() / tau, dim=-1)
    teacher = F.log_softmax(teacher_logits[..., :vocab].float() / tau, dim=-1)
    return tau ** 2 * F.kl_div(student, teacher, log_target=True, reduction="batchmean")


class LAidObjective:
    """The four terms of LAid on a batch, for a teacher / student pair and their :class:`HeadMixer`.

    Args:
        teacher, student: Qwen2_5_VLForConditionalGeneration (possibly wrapped by accelerate); hooks are placed
            on the unwrapped modules, so build this before or after ``accelerator.prepare``.
        mixer: HeadMixer with one entry per pair of ``config.layer_pairs``.
        config: the run's LAidConfig (layer pairs, lambdas, beta, alpha, tau, kernel backend).
        vocab: the shared tokenizer length (len(processor.tokenizer)).

    Call with a batch (input_ids, attention_mask, labels [B, N]; pixel_values, image_grid_thw optional) and the
    training progress p in [0, 1]; returns a dict of 0-dim fp32 tensors: "loss" and each enabled term of
    "qk", "attn", "kl", "sft".
    """

    def __init__(self, teacher: nn.Module | None, student: nn.Module, mixer: HeadMixer | None, config: LAidConfig,
                 vocab: int):
        if config.needs_teacher and teacher is None:
            raise ValueError("teacher is required: lambda_laid > 0 or lambda_kl > 0")
        if config.lambda_laid > 0 and mixer is None:
            raise ValueError("mixer is required: lambda_laid > 0")
        if teacher is not None:
            check_compatible(teacher, student, vocab)
        self.teacher, self.student, self.mixer, self.config, self.vocab = teacher, student, mixer, config, vocab
        s_layers = len(decoder_layers(student))
        pairs = [(resolve_layer(s, s_layers, "layer_pairs (student)"),
                  resolve_layer(t, len(decoder_layers(teacher)), "layer_pairs (teacher)"))
                 for s, t in config.layer_pairs] if config.lambda_laid > 0 else []
        if mixer is not None and mixer.w_q.shape[0] != len(pairs):
            raise ValueError(f"mixer has {mixer.w_q.shape[0]} pairs, layer_pairs has {len(pairs)}")
        # Q/K are captured only for L_qk / L_attn; without them (the SFT baselines) the student trains as the plain
        # model, without the RoPE gain.
        student_layers = [s for s, _ in pairs]
        teacher_layers = sorted({t for _, t in pairs})
        self.teacher_slot = [teacher_layers.index(t) for _, t in pairs]
        self.student_capture = QKCapture(student, student_layers, gain=mixer.gain_channels if mixer else None)
        self.teacher_capture = QKCapture(teacher, teacher_layers) if teacher is not None else None
        # A model whose logits are not needed stops after its last aligned layer.
        self.teacher_last = None if config.lambda_kl > 0 else max(teacher_layers, default=None)
        self.student_last = None if config.lambda_kl + config.lambda_sft > 0 else max(student_layers)
        rotary = unwrap(student).model.language_model.rotary_emb
        self.inv_freq = rotary.inv_freq.float()
        self.mrope_section = tuple(rotary.mrope_section)
        self.image_token_id = unwrap(student).config.image_token_id
        self.check_grad = config.train_language_model

    @staticmethod
    def _forward(model: nn.Module, batch: dict, positions: torch.Tensor,
                 keep: torch.Tensor | None) -> torch.Tensor | None:
        """Logits [B, K, V] at positions ``keep`` [K]; with keep None, the lm_head projects zero positions and the
        result is None.

        Always a call of ``model`` itself (the DDP / FSDP root with accelerate's autocast), never of an inner
        module: under FSDP2 the root's parameters (vision patch embedding, merger) are gathered only by the root's
        forward, and accelerate's autocast wraps the prepared model's forward.
        """
        if "image_pixels" in batch:  # a loader batch: its images would be silently left out
            raise ValueError("batch holds uint8 image_pixels: pass laid.prompt_inputs.model_inputs(batch, device)")
        inputs = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if batch.get(k) is not None}
        inputs.update(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                      use_cache=False)
        logits = model(logits_to_keep=keep if keep is not None else _NO_POSITIONS.to(positions.device),
                       **inputs).logits
        return logits if keep is not None else None

    def __call__(self, batch: dict, progress: float) -> dict[str, torch.Tensor]:
        config = self.config
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        valid = attention_mask.bool()
        positions = mrope_positions(self.student, input_ids, attention_mask, batch.get("image_grid_thw"))
        keep, select, targets = answer_positions(batch["labels"])

        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad(), stop_after(self.teacher, self.teacher_last), self.teacher_capture.record():
                teacher_logits = self._forward(self.teacher, batch, positions,
                                               None if self.teacher_last is not None else keep)
        # The student always runs through its (DDP / FSDP) wrapper, so that gradients are synchronised.
        with stop_after(self.student, self.student_last), self.student_capture.record():
            student_logits = self._forward(self.student, batch, positions,
                                           None if self.student_last is not None else keep)
        if self.check_grad and torch.is_grad_enabled():
            for q, k in zip(self.student_capture.queries, self.student_capture.keys):
                if not (q.requires_grad and k.requires_grad):
                    raise RuntimeError("captured student Q/K do not require grad: gradient checkpointing must be "
                                       "non-reentrant (use_reentrant=False), or the aligned layers are frozen")

        terms: dict[str, torch.Tensor] = {}
        if config.lambda_laid > 0:
            inv_freq = self.inv_freq.to(input_ids.device)
            query_mask = attention_rows(input_ids, attention_mask, self.image_token_id, config.attn_rows)
            qk, attn = [], []
            for pair, slot in enumerate(self.teacher_slot):
                args = (self.student_capture.queries[pair], self.student_capture.keys[pair],
                        self.teacher_capture.queries[slot], self.teacher_capture.keys[slot],
                        self.mixer.w_q[pair], self.mixer.w_k[pair], positions, inv_freq, self.mrope_section)
                if config.qk_weight > 0:
                    qk.append(laid_kernels.qk_align_loss(*args, valid=valid, normalize=config.qk_normalize,
                                                         backend=config.kernel_backend))
                if config.beta > 0:
                    if config.attn_heads == "best":
                        args = args[:4] + (self.mixer.best_teacher_heads(pair),) + args[5:]
                    attn.append(laid_kernels.attn_match_loss(*args, query_mask, progress=progress,
                                                             alpha=config.alpha, valid=valid,
                                                             target=config.attn_target,
                                                             divergence=config.attn_divergence,
                                                             backend=config.kernel_backend))
            if qk:
                terms["qk"] = torch.stack(qk).mean()
            if attn:
                terms["attn"] = torch.stack(attn).mean()
        if config.lambda_kl > 0:
            terms["kl"] = distill_kl(student_logits[select], teacher_logits[select], self.vocab, config.tau)
        if config.lambda_sft > 0:
            terms["sft"] = F.cross_entropy(student_logits[select].float(), targets[select])

        laid = config.qk_weight * terms.get("qk", 0.0) + config.beta * terms.get("attn", 0.0)
        terms["loss"] = (config.lambda_laid * laid + config.lambda_kl * terms.get("kl", 0.0)
                         + config.lambda_sft * terms.get("sft", 0.0))
        self._release()
        return terms

    def _release(self) -> None:
        """Drop the captured Q/K: the loss's graph keeps what backward needs and frees it during backward, so nothing
        captured lives through the optimizer step and the next teacher forward."""
        self.student_capture.clear()
        if self.teacher_capture is not None:
            self.teacher_capture.clear()

    def init_mixer(self, batch: dict) -> None:
        """Initialise the mixer's W_q / W_k by ``config.mixer_init`` ("lstsq" uses this batch's Q/K, from forwards
        of the models as given: the prepared student, under accelerate's autocast and FSDP root)."""
        if self.mixer is None:
            return
        if self.config.mixer_init == "uniform":
            self.mixer.init_uniform()
            return
        if self.config.mixer_init == "nearest":
            self.mixer.init_nearest()
            return
        positions = mrope_positions(self.student, batch["input_ids"], batch["attention_mask"],
                                    batch.get("image_grid_thw"))
        with torch.no_grad():
            for model, capture in ((self.teacher, self.teacher_capture), (self.student, self.student_capture)):
                with stop_after(model, max(capture.layers)), capture.record():
                    self._forward(model, batch, positions, None)
        valid = batch["attention_mask"].bool()
        student, teacher = self.student_capture, self.teacher_capture
        for pair, slot in enumerate(self.teacher_slot):
            query_stats = self.mixer.lstsq_statistics(student.queries[pair], teacher.queries[slot], valid)
            key_stats = self.mixer.lstsq_statistics(student.keys[pair], teacher.keys[slot], valid)
            self.mixer.init_lstsq(pair, query_stats, key_stats, ridge=self.config.mixer_ridge)
        self._release()

    def remove_hooks(self) -> None:
        """Detach the capture hooks (and the gain) from both models."""
        self.student_capture.remove()
        if self.teacher_capture is not None:
            self.teacher_capture.remove()
