"""``cprd_blip_retrieval``: LAVIS's BLIP retrieval model at any size, offline.

The cross-encoder teacher of the embedded default is trained with LAVIS's own machinery:
``BlipRetrieval``'s ITC + ITM-with-hard-negatives objective (momentum distillation included),
LAVIS's ``retrieval`` task and runner. This subclass only changes construction: towers of
explicit sizes (``vit_type: custom``, ``text_*``), an optional pre-trained text tower
(``text_pretrained``), a local tokenizer, random init when no checkpoint is configured, and
momentum encoders copied from the *loaded* towers. ``pretrained`` may be a checkpoint of a
``cprd_dual_encoder`` with the same tower sizes: BLIP's ITM is fine-tuned from ITC-trained
towers (cross-attention layers start random); trained from scratch, ITM's gradients through
the shared text tower stall ITC.
Its checkpoints use BLIP's key names, so ``blip_image_text_matching`` teachers load them.

One addition to the objective, on data that provides it: look-alike ITM negatives. When the
train samples carry ``lookalike_text`` (``datasets.cprd_shapes.lookalike_negatives``), each
image is also matched with a minimal edit of its caption that is false of it, as a negative:
``loss += lookalike_weight * CE(itm_head(image, lookalike), 0)``. BLIP's own ITM negatives are
other images' captions, which rarely differ in one attribute, so the tiny teacher never
learned attribute binding from them (issue 16).

``itm_negatives: verified`` goes further, for partial captions, where an in-batch negative is
often true of the image (a label BLIP gets wrong): LAVIS's ITM term is dropped and replaced by
one CE over BLIP's positive pairs and the samples' ``positive_text`` (another image's caption
the generator verified true), the look-alikes, ``negative_text`` (a hard caption verified
false) and ``random_negative_text`` (a random false one; all from
``datasets.cprd_shapes.verified_negatives``). LAVIS's ITC term is kept; ``lookalike_weight``
applies to ``in_batch`` only. LAVIS's forward still scores its in-batch pairs (the result is
unused), a cost left in to keep its code uncopied. ``itm_targets: graded`` (with ``verified``)
trains the false captions' match probability towards their graded relevance to the image
(the fraction of their facts that hold) instead of 0: a soft cross-entropy
``-(g log p1 + (1 - g) log p0)``, so the teacher orders partly true captions by how much of
them holds (issue 16's measured ranking target).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lavis.common.registry import registry
from lavis.models.blip_models.blip_retrieval import BlipRetrieval

from lavis_cprd.checkpoints import load_weights
from lavis_cprd.models.model_types import NamedModelTypes
from lavis_cprd.towers import build_text_encoder, build_vision_encoder
from lavis_cprd.paths import MODEL_CONFIGS
from lavis_cprd.tokenization import with_local_tokenizer



@registry.register_model("cprd_blip_retrieval")
class CprdBlipRetrieval(NamedModelTypes, BlipRetrieval):
    """LAVIS's BLIP retrieval model (ITC + ITM) at any size, offline: trains tiny cross-encoder teachers.

    ``itm_negatives: verified`` replaces its in-batch ITM negatives by captions checked against the scene.
    """

    lookalike_weight = 1.0
    itm_negatives = "in_batch"
    PRETRAINED_MODEL_CONFIG_DICT = {"tiny": os.path.join(MODEL_CONFIGS, "cprd_blip_retrieval_tiny.yaml")}

    @classmethod
    def from_config(cls, cfg=None):
        image_encoder = build_vision_encoder(cfg)
        text_encoder = build_text_encoder(cfg, cross_attention=True, encoder_width=image_encoder.vision_width)
        model_cls = with_local_tokenizer(cls, cfg.get("tokenizer_path", None))
        model = model_cls(
            image_encoder=image_encoder,
            text_encoder=text_encoder,
            queue_size=int(cfg.get("queue_size", 256)),
            alpha=float(cfg.get("alpha", 0.4)),
            embed_dim=int(cfg.get("embed_dim", 256)),
            momentum=float(cfg.get("momentum", 0.995)),
            negative_all_rank=bool(cfg.get("negative_all_rank", False)),
            max_txt_len=int(cfg.get("max_txt_len", 35)),
        )
        model.lookalike_weight = float(cfg.get("lookalike_weight", 1.0))
        model.itm_negatives = str(cfg.get("itm_negatives", "in_batch"))
        model.itm_targets = str(cfg.get("itm_targets", "hard"))
        if model.itm_negatives not in ("in_batch", "verified"):
            raise ValueError(f"model.itm_negatives must be 'in_batch' or 'verified', got {model.itm_negatives!r}")
        if model.itm_targets not in ("hard", "graded") or (model.itm_targets == "graded" and model.itm_negatives != "verified"):
            raise ValueError(f"model.itm_targets must be 'hard', or 'graded' with itm_negatives: verified; got "
                             f"{model.itm_targets!r} with {model.itm_negatives!r}")
        if model.lookalike_weight < 0:
            raise ValueError(f"model.lookalike_weight must be >= 0, got {model.lookalike_weight}")
        load_weights(model, cfg, "cprd_blip_retrieval", local_pretrained_as_checkpoint=True)
        # BlipRetrieval copies its momentum encoders at construction, before any weights are
        # loaded, and LAVIS checkpoints omit them (frozen): copy again from the loaded towers.
        model.copy_params()
        model.reset_queue_ptr()
        return model

    def _itm_logits(self, image_embeds: torch.Tensor, texts) -> torch.Tensor:
        """ITM logits of each image with its text, as BLIP's own ITM forward computes them."""
        text = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_txt_len,
                              return_tensors="pt").to(self.device)
        input_ids = text.input_ids.clone()
        input_ids[:, 0] = self.tokenizer.enc_token_id  # ITM mode
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        hidden = self.text_encoder(input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                                   encoder_attention_mask=image_atts, return_dict=True).last_hidden_state[:, 0, :]
        return self.itm_head(hidden)

    def _verified(self, image_embeds: torch.Tensor, samples, key: str, label: int):
        """ITM logits on the verified captions ``samples[key]`` (false ones, or other true
        ones) and their targets: ``label``, or with graded targets a false caption's graded
        relevance (``samples["<name>_grade"]``). An entry equal to its own caption marks "none
        found" and is skipped; ``(None, None)`` when every entry is."""
        keep = [t != own for t, own in zip(samples[key], samples["text_input"])]
        if not any(keep):
            return None, None
        kept = torch.tensor(keep, device=self.device)
        logits = self._itm_logits(image_embeds[kept], [t for t, k in zip(samples[key], keep) if k])
        grade_key = key.replace("_text", "_grade")
        if self.itm_targets != "graded" or label == 1:
            return logits, torch.full((len(logits),), float(label), device=self.device)
        if grade_key not in samples:
            raise ValueError(f"model.itm_targets: graded needs train samples with {grade_key!r} (cprd_shapes)")
        grades = torch.as_tensor(samples[grade_key], dtype=torch.float32, device=self.device).view(-1)
        return logits, grades[kept]

    def forward(self, samples):
        """BLIP's ITC + ITM (LAVIS), plus the look-alike ITM term when samples carry one; with
        ``itm_negatives: verified``, LAVIS's ITM term is replaced by one on the positives and the
        samples' verified-false captions."""
        output = super().forward(samples)
        image_embeds = output.intermediate_output.image_embeds
        if self.itm_negatives == "verified":
            verified = (("positive_text", 1), ("lookalike_text", 0), ("negative_text", 0), ("random_negative_text", 0))
            missing = [k for k, _ in verified if k not in samples]
            if missing:
                raise ValueError(f"model.itm_negatives: verified needs train samples with {missing}: set "
                                 "datasets.cprd_shapes.verified_negatives and lookalike_negatives to true")
            logits = [output.intermediate_output.itm_logits[: len(samples["text_input"])]]  # BLIP's positives
            targets = [torch.ones(len(logits[0]), device=self.device)]
            for key, label in verified:
                x, target = self._verified(image_embeds, samples, key, label)
                if x is not None:
                    logits.append(x)
                    targets.append(target)
            logits, target = torch.cat(logits), torch.cat(targets)
            if self.itm_targets == "graded":  # soft cross-entropy towards graded relevance
                log_p = F.log_softmax(logits.float(), dim=-1)
                output.loss_itm = -(target * log_p[:, 1] + (1 - target) * log_p[:, 0]).mean()
            else:
                output.loss_itm = F.cross_entropy(logits, target.long())
            output.loss = output.loss_itc + output.loss_itm
            return output
        if samples.get("lookalike_text") is None or self.lookalike_weight == 0:
            return output
        logits, _ = self._verified(image_embeds, samples, "lookalike_text", 0)
        if logits is None:
            return output
        loss_lookalike = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=self.device))
        output.loss = output.loss + self.lookalike_weight * loss_lookalike
        output.loss_lookalike = loss_lookalike
        return output
