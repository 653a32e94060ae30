"""Train an embedding model on (anchor, positive, negatives) rows with the fused InfoNCE loss.

Encoders (BERT-like, e.g. the default all-MiniLM-L6-v2) train in full with their own pooling (mean).
Decoder LLMs (a causal-LM directory) become Transformer + last-token (EOS) pooling + Normalize, with an
EOS appended to every input (plain text, never rendered through a chat template) and LoRA adapters on all
linear layers (the E5-mistral recipe); the adapters are merged before saving, so the result is a plain
sentence-transformers directory that `SentenceTransformer(path)` loads offline, with no peft and no
base checkpoint needed.
The sentence-transformers trainer runs the loop: bf16 autocast on CUDA, fp32 on CPU, DDP under torchrun
or accelerate (then every process scores its queries against the documents of all processes).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sentence_transformers.base.losses.gradcache import CachedLossMixin
from sentence_transformers.base.sampler import NoDuplicatesBatchSampler
from torch import Tensor, nn

from speedx.embed.data import to_dataset
from speedx.embed.default_embedder import LOAD_ERRORS, load_error, load_sentence_transformer, resolve_embedder
from speedx.embed.losses import InfoNCELoss

POOLINGS = ("auto", "mean", "lasttoken")
DECODER_MAX_LENGTH = 512  # E5 recipe; for tokenizers with no real limit (decoders claim 128k)


@dataclass
class TrainConfig:
    model: str = "default"
    epochs: float = 1.0
    batch_size: int = 32
    lr: float | None = None  # None: 2e-5 for full fine-tuning, 1e-4 with LoRA (E5)
    max_steps: int | None = None
    lora: bool | None = None  # None: LoRA for decoders, full fine-tuning for encoders
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    pooling: str = "auto"
    mini_batch_size: int | None = None  # GradCache chunk; None: one forward per batch
    scale: float = 50.0  # 1 / temperature (E5: 0.02)
    seed: int = 0
    max_length: int | None = None
    warmup_ratio: float = 0.1
    device: str | None = None  # "cpu" or "cuda"; None: CUDA when available
    progress: bool = True

    def check(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        for name in ("batch_size", "lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1")
        for name in ("mini_batch_size", "max_steps", "max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1")
        if not self.epochs > 0 or not self.scale > 0 or (self.lr is not None and not self.lr > 0):
            raise ValueError("epochs, scale and lr must be positive")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda asked for, but torch sees no CUDA device")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.lora_dropout < 1:
            raise ValueError("warmup-ratio and lora-dropout must lie in [0, 1)")


# ----------------------------------------------------------------------------------------------- model

def is_causal_lm(path: str | Path) -> bool:
    """A Hugging Face causal-LM checkpoint directory (LlamaForCausalLM, Qwen2ForCausalLM, ...)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def load_model(cfg: TrainConfig):
    """(SentenceTransformer, uses_lora) for cfg.model: 'default', a sentence-transformers directory
    (its own modules and pooling) or a Hugging Face directory (encoder: mean, causal LM: last token)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    path = resolve_embedder(cfg.model)
    if not Path(path).is_dir():
        raise ValueError(f"model {cfg.model!r} is not a directory (pass 'default' or a local model directory)")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device == "cuda"
    if on_gpu:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # under torchrun, each process on its own GPU
    if (Path(path) / "modules.json").is_file():  # a sentence-transformers directory
        model = load_sentence_transformer(path, device=device)
        pool = next((m for m in model if isinstance(m, Pooling)), None)
        decoder = pool is not None and pool.pooling_mode == "lasttoken"  # as saved, before --pooling
        if cfg.pooling != "auto":
            if pool is None:
                raise ValueError(f"{path} has no Pooling module to set to {cfg.pooling}")
            pool.pooling_mode = cfg.pooling
    else:
        decoder = is_causal_lm(path)
        pooling = cfg.pooling if cfg.pooling != "auto" else ("lasttoken" if decoder else "mean")
        use_lora = cfg.lora if cfg.lora is not None else decoder
        # Frozen decoder weights can sit in bf16 on a GPU; trained weights stay fp32 (autocast does bf16).
        dtype = torch.bfloat16 if on_gpu and use_lora and decoder else torch.float32
        try:
            transformer = Transformer(path, model_kwargs={"dtype": dtype}, config_kwargs={"local_files_only": True},
                                      processor_kwargs={"local_files_only": True})
        except LOAD_ERRORS as exc:
            raise load_error(path, exc) from None
        if transformer.max_seq_length is None or transformer.max_seq_length > 100_000:
            transformer.max_seq_length = DECODER_MAX_LENGTH
        model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling),
                                            Normalize()], device=device, similarity_fn_name="cosine")
        pool = model[1]
    if cfg.max_length is not None:
        model.max_seq_length = cfg.max_length
    if pool is not None and pool.pooling_mode == "lasttoken":
        plain_text_input(model[0])
        append_eos(model[0].tokenizer)
    use_lora = cfg.lora if cfg.lora is not None else decoder
    if use_lora:
        add_lora(model, cfg)
    return model, use_lora


def plain_text_input(transformer) -> None:
    """Feed the model the text itself. When the tokenizer has a chat template, sentence-transformers adds a
    "message" modality and renders every input through the template (`<role>: text ...`, no EOS), so
    last-token pooling would not read the text's EOS. Without it, inputs are tokenized as text + EOS. The
    modality config is saved with the model, so SentenceTransformer(path) keeps feeding plain text."""
    transformer.modality_config = {k: v for k, v in transformer.modality_config.items() if k != "message"}
    transformer.input_formatter.supported_modalities = list(transformer.modality_config)


def append_eos(tokenizer) -> None:
    """Make the tokenizer end every input with EOS (the token last-token pooling reads), and pad with EOS
    when it has no pad token. It is saved with the model, so inference appends the same EOS."""
    from tokenizers import processors

    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    last = tokenizer("a")["input_ids"][-1]
    if eos is None:
        if tokenizer.sep_token_id is not None and last == tokenizer.sep_token_id:
            return  # BERT-style: [SEP] already ends every input
        raise ValueError("last-token pooling needs a tokenizer with an eos_token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = eos
    if last == eos_id:  # already appends it (e.g. Qwen3-Embedding)
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"cannot append EOS with a {type(tokenizer).__name__} (need a fast tokenizer)")
    template = processors.TemplateProcessing(single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
                                             special_tokens=[(eos, eos_id)])
    # Keep what the tokenizer already does (e.g. Llama 3's BOS), then add the EOS.
    old = backend.post_processor
    backend.post_processor = template if old is None else processors.Sequence([old, template])


def add_lora(model, cfg: TrainConfig) -> None:
    """Wrap the transformer in a PEFT LoRA model (all linear layers; the base is frozen)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear")
    model[0].model = get_peft_model(model[0].model, lora)


def merge_lora(model) -> None:
    """Fold the adapters into the base weights: the saved model is a plain transformers model."""
    from peft import PeftModel

    if isinstance(model[0].model, PeftModel):
        model[0].model = model[0].model.merge_and_unload()


# ------------------------------------------------------------------------------------------------ loss

class CachedInfoNCELoss(CachedLossMixin, nn.Module):
    """InfoNCELoss with GradCache (Gao et al. 2021): embed the batch in chunks of mini_batch_size without
    a graph, take the loss and its gradient w.r.t. the embeddings over the whole batch, then re-embed
    chunk by chunk with a graph and back-propagate those cached gradients. Same loss and gradient as the
    full batch, with activation memory of one chunk. sentence-transformers' CachedLossMixin does the
    three steps (RNG replay for dropout, DDP sync); this class only supplies the loss."""

    def __init__(self, model: nn.Module, mini_batch_size: int, **loss_kwargs: Any) -> None:
        super().__init__()
        self.model = model
        self.loss = InfoNCELoss(model, **loss_kwargs)
        self.mini_batch_size = mini_batch_size

    def forward(self, sentence_features, labels: Tensor | None = None) -> Tensor:
        return self.forward_cached(sentence_features, labels)

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        loss = self.loss.compute_loss_from_embeddings([torch.cat(chunks) for chunks in reps], labels)
        if with_backward:
            loss.backward()
            return loss.detach()
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        return {**self.loss.get_config_dict(), "mini_batch_size": self.mini_batch_size}


def build_loss(model, cfg: TrainConfig, gather_across_devices: bool = False) -> nn.Module:
    kwargs = {"scale": cfg.scale, "gather_across_devices": gather_across_devices}
    if cfg.mini_batch_size is not None and cfg.mini_batch_size < cfg.batch_size:
        return CachedInfoNCELoss(model, cfg.mini_batch_size, **kwargs)
    return InfoNCELoss(model, **kwargs)


# ---------------------------------------------------------------------------------------------- train

class ExactNoDuplicatesBatchSampler(NoDuplicatesBatchSampler):
    """sentence-transformers' NoDuplicatesBatchSampler, whose len() is the number of batches a pass
    really yields. A row that shares a text with the batch (mined negatives are often other rows'
    positives) is deferred to a later batch, so a pass can yield more, smaller batches than
    ceil(rows / batch_size); the Trainer sizes the run from len() and would cut those off the end."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._passes: dict[int, list[list[int]]] = {}  # epoch -> its batches (the current one only)
        self._sampling = False

    def _batches(self) -> list[list[int]]:
        if self.epoch not in self._passes:
            self._sampling = True  # the parent's __iter__ asks len() for the nominal count
            try:
                self._passes = {self.epoch: list(super().__iter__())}
            finally:
                self._sampling = False
        return self._passes[self.epoch]

    def __len__(self) -> int:
        return super().__len__() if self._sampling else len(self._batches())

    def __iter__(self):
        return iter(self._batches())


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def train_embedder(rows: list[dict], cfg: TrainConfig, out_dir: str | Path | None = None):
    """Train cfg.model on rows ({"anchor", "positive", "negatives"}) and return (model, stats); with
    out_dir, save the model there (plus speedx_train.json)."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers import set_seed

    cfg.check()
    set_seed(cfg.seed)
    model, use_lora = load_model(cfg)
    dataset = to_dataset(rows)
    distributed = world_size() > 1
    if distributed and hasattr(dataset, "keys"):
        # Cross-device negatives gather equal-sized batches from every process: one column layout only.
        raise ValueError(f"rows have different numbers of negatives ({', '.join(dataset)}); distributed "
                         "training needs one: mine negatives for every row (python -m speedx.embed.mine) "
                         "or use --max-negatives 0")
    loss = build_loss(model, cfg, gather_across_devices=distributed)
    on_gpu = model.device.type == "cuda"
    # Whole warmup steps, rounded down: the first warmup step has a learning rate of 0, so a run of
    # fewer than 1 / warmup_ratio steps gets none (with HF's rounding up, a 1-step run would not train).
    steps = cfg.max_steps or math.ceil(cfg.epochs * math.ceil(len(rows) / (cfg.batch_size * world_size())))
    warmup_steps = int(cfg.warmup_ratio * steps)
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        args = SentenceTransformerTrainingArguments(
            output_dir=scratch,  # nothing is written there: checkpoints are off
            num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps or -1,
            per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.lr or (1e-4 if use_lora else 2e-5),
            warmup_steps=warmup_steps,
            lr_scheduler_type="linear",
            bf16=on_gpu and torch.cuda.is_bf16_supported(),
            batch_sampler=ExactNoDuplicatesBatchSampler,  # a duplicate in the batch would be a false negative
            dataloader_drop_last=distributed,
            dataloader_pin_memory=on_gpu,
            use_cpu=not on_gpu,  # also what makes torchrun on CPUs run DDP (gloo)
            seed=cfg.seed,
            save_strategy="no",
            report_to="none",
            logging_steps=10,
            disable_tqdm=not cfg.progress,
        )
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
        result = trainer.train()
    merge_lora(model)
    stats = {"examples": len(rows), "steps": result.global_step, "train_loss": result.training_loss,
             "train_seconds": round(time.time() - started, 2), "lora": use_lora,
             "learning_rate": args.learning_rate, "bf16": args.bf16, "world_size": world_size()}
    if out_dir is not None and trainer.is_world_process_zero():
        out_dir = Path(out_dir)
        model.save(str(out_dir))
        (out_dir / "speedx_train.json").write_text(json.dumps({"config": asdict(cfg), **stats}, indent=2) + "\n")
    return model, stats
