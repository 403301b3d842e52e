"""Knowledge-distillation initialisation of the auxiliary model (server side, once).

Student: the auxiliary model, no prefix, all parameters trainable. Teacher:
the frozen global model, no prefix. Loss (``--kd-objective``): ``hidden``, the
paper's, the MSE between the last hidden states (after the final norm), masked
to real tokens (the reference code also averaged over padding); ``logits``, the
KL divergence from the teacher's next-token distribution to the student's at
every real token (what a prompt's gradient is taken through); ``both``, their
sum. The paper's learnable W_S (``projection=True``) maps the student's states
before the hidden-state loss; the reference code has none (default).

The teacher's states are computed once per example and kept (they never
change), so each KD step costs only the student's forward and backward.
:func:`distilled_auxiliary_model` builds the auxiliary model of a run and
distils it, or reuses the distilled weights from the cache folder. With a pruned
vocabulary (fedsp.models.vocabulary) the student reads the kept ids, and each row
is distilled up to its first token that is not kept.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from fedsp.config import LOWRANK, RunConfig, parse_embedding
from fedsp.data.batching import BatchStream, Encoded, collate
from fedsp.errors import FedSPError
from fedsp.files import atomic_write
from fedsp.methods.optim import OptimConfig, Phase
from fedsp.models.auxiliary import build_auxiliary_model, depth_plan, select_layers
from fedsp.models.embedding import factorise_embedding
from fedsp.models.forward import head_logits, hidden_states
from fedsp.models.loading import LoadedModel, cache_dir
from fedsp.models.vocabulary import choose_vocabulary, prune_embedding
from fedsp.spellings import BOTH, HIDDEN, LOGITS


@dataclass(frozen=True)
class KDConfig:
    steps: int
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    batch_size: int = 16
    projection: bool = False  # the paper's learnable W_S
    max_grad_norm: float = 0.0  # 0: no clipping
    objective: str = HIDDEN  # --kd-objective: hidden, logits or both

    def fingerprint(self) -> dict:
        """What the distilled weights depend on; the objective only when not the hidden states', so the
        cache keys of models distilled before the option existed stay valid."""
        out = asdict(self)
        if self.objective == HIDDEN:
            del out["objective"]
        return out


def kd_config_from(config: RunConfig, steps: int | None = None) -> KDConfig:
    """A run's KD settings (``steps``: instead of ``--kd-steps``)."""
    return KDConfig(
        config.kd_steps if steps is None else steps,
        config.kd_lr,
        config.weight_decay,
        config.warmup_ratio,
        config.kd_batch_size,
        config.kd_projection,
        config.max_grad_norm,
        config.kd_objective,
    )


class _TeacherStates:
    """Teacher hidden states per row, computed on first use."""

    def __init__(self, teacher: PreTrainedModel, rows: Sequence[Encoded]) -> None:
        self.teacher = teacher
        self.index = {r.ids: i for i, r in enumerate(rows)}
        self.states: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def batch(self, batch: dict[str, torch.Tensor], rows: Sequence[tuple[int, ...]]) -> torch.Tensor:
        missing = [i for i, ids in enumerate(rows) if self.index[ids] not in self.states]
        if missing:
            hidden = hidden_states(
                self.teacher, batch["input_ids"][missing], batch["attention_mask"][missing]
            )
            for j, i in enumerate(missing):
                n = len(rows[i])
                self.states[self.index[rows[i]]] = hidden[j, :n].float().clone()
        out = torch.zeros(*batch["input_ids"].shape, self.teacher.config.hidden_size)
        for i, ids in enumerate(rows):
            out[i, : len(ids)] = self.states[self.index[ids]]
        return out  # (B, T, H), zeros on padding


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over real tokens and hidden units: (B,T,H) x (B,T,H) x (B,T) -> scalar."""
    teacher, mask = (
        teacher.to(student.device),
        mask.to(student.device),
    )  # cached teacher states live on the CPU
    weights = mask.unsqueeze(-1).to(student.dtype)
    return ((student.float() - teacher) ** 2 * weights).sum() / (weights.sum() * student.shape[-1])


def masked_kl(
    student_head: nn.Module,
    teacher_head: nn.Module,
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, mean over real tokens.

    ``student``/``teacher``: last hidden states (B,T,H); each goes through its own model's head in float32.
    ``columns``: the teacher's vocabulary ids the student's head rows stand for (a pruned vocabulary); the
    teacher's distribution is then renormalised over them."""
    keep = mask.to(student.device).bool()
    student_logits = head_logits(student_head, student[keep])  # (n, V_student)
    with torch.no_grad():
        head_device = next(teacher_head.parameters()).device
        teacher_logits = head_logits(teacher_head, teacher.to(head_device)[keep.to(head_device)])
        if columns is not None:
            teacher_logits = teacher_logits[:, columns.to(head_device)]
        teacher_logp = torch.log_softmax(teacher_logits, dim=-1).to(student.device)
    student_logp = torch.log_softmax(student_logits, dim=-1)
    return torch.nn.functional.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean")


def distill(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    rows: Sequence[Encoded],
    config: KDConfig,
    pad_id: int,
    seed: int,
    progress: bool = True,
    student_ids: torch.Tensor | None = None,
    trainable: Sequence[nn.Parameter] | None = None,
    kept_ids: torch.Tensor | None = None,
) -> list[float]:
    """Train ``student`` to match ``teacher`` (``config.objective``); returns the loss per step.

    ``student_ids``: global id -> the student's id (a pruned vocabulary; ``rows`` use kept ids only);
    ``kept_ids``: the global id each of the student's head rows stands for (the same vocabulary).
    ``trainable``: the student's parameters KD updates (default: all of them; Offsite-Tuning's emulator
    distils its middle layers only, its adapters stay the global model's)."""
    stream = BatchStream(rows, config.batch_size, pad_id, seed)
    teacher_states = _TeacherStates(teacher, rows)
    w_s = (
        nn.Linear(teacher.config.hidden_size, teacher.config.hidden_size, bias=False)
        if config.projection and config.objective != LOGITS  # W_S maps states for the hidden-state loss only
        else None
    )
    if w_s is not None:
        nn.init.eye_(w_s.weight)
    own = list(student.parameters()) if trainable is None else list(trainable)
    params = own + (list(w_s.parameters()) if w_s is not None else [])
    optim = OptimConfig(config.lr, config.weight_decay, config.warmup_ratio, grad_clip=config.max_grad_norm)
    phase = Phase(params, optim, config.steps)
    student.train()
    losses = []
    bar = tqdm(range(config.steps), desc="KD", unit="step", disable=not progress, leave=False)
    for _ in bar:
        picked = stream.next_rows()
        batch = collate(picked, pad_id)
        target = teacher_states.batch(batch, [r.ids for r in picked])
        ids = batch["input_ids"] if student_ids is None else student_ids[batch["input_ids"]]
        hidden = hidden_states(student, ids, batch["attention_mask"])
        loss = torch.zeros((), device=hidden.device)
        if config.objective in (LOGITS, BOTH):
            loss = loss + masked_kl(
                student.get_output_embeddings(),
                teacher.get_output_embeddings(),
                hidden,
                target,
                batch["attention_mask"],
                kept_ids,
            )
        if config.objective in (HIDDEN, BOTH):
            mapped = w_s(hidden.float()) if w_s is not None else hidden
            loss = loss + masked_mse(mapped, target, batch["attention_mask"])
        losses.append(phase.step(loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    student.eval()
    return losses


@torch.no_grad()
def mean_kd_loss(
    teacher: PreTrainedModel, student: PreTrainedModel, batches: Sequence[dict[str, torch.Tensor]]
) -> float:
    """Masked hidden-state MSE of ``student`` against ``teacher`` over fixed batches."""
    total, count = 0.0, 0
    for batch in batches:
        t = hidden_states(teacher, batch["input_ids"], batch["attention_mask"]).float()
        s = hidden_states(student, batch["input_ids"], batch["attention_mask"])
        n = int(batch["attention_mask"].sum())
        total += float(masked_mse(s, t, batch["attention_mask"])) * n
        count += n
    return total / count


def cache_key(
    model_name: str,
    model_config: dict,
    layers: Sequence[int],
    plan: Sequence[int] | None,
    config: KDConfig,
    rows: Sequence[Encoded],
    seed: int,
    embedding: str = "full",
    extra: dict | None = None,
) -> str:
    """A digest of everything the distilled weights depend on (``plan``: the selected layer each depth
    runs, :func:`~fedsp.models.auxiliary.depth_plan`; None when the layers are not shared; ``embedding``:
    ``--aux-embedding``, in the digest only when not the full embedding, so older keys stay valid;
    ``extra``: anything else a caller's student depends on, in the digest only when given)."""
    digest = hashlib.sha256()
    meta = {
        "model": model_name,
        "config": model_config,
        "layers": list(layers),
        "depths": None if plan is None else list(plan),
        "kd": config.fingerprint(),
        "seed": seed,
    }
    if embedding != "full":
        meta["embedding"] = embedding
    if extra:
        meta["extra"] = extra
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for row in rows:
        digest.update(str(row.ids).encode())
    return digest.hexdigest()[:24]


def save_student(student: nn.Module, path: Path, losses: Sequence[float] = ()) -> None:
    """Save the unique parameters (shared ones once) and the KD losses that made them, atomically."""
    tensors = {name: p.detach().contiguous().cpu() for name, p in student.named_parameters()}
    atomic_write(path, save(tensors, metadata={"kd_losses": json.dumps([float(x) for x in losses])}))


def load_student(student: nn.Module, path: Path) -> list[float]:
    """Load a saved student's parameters; returns the KD losses saved with them ([] if none were)."""
    saved = load_file(str(path))
    own = dict(student.named_parameters())
    if set(saved) != set(own):
        raise ValueError(f"cached auxiliary model {path} does not match this auxiliary model's parameters")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(saved[name])
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return [float(x) for x in json.loads(metadata.get("kd_losses", "[]"))]


def distilled_auxiliary_model(
    config: RunConfig,
    loaded: LoadedModel,
    server_rows: list[Encoded],
    share: bool = True,
    kd_steps: int | None = None,
    layers: list[int] | None = None,
) -> tuple[PreTrainedModel, list[int], list[float]]:
    """Build the auxiliary model and run (or reuse from the cache) its KD initialisation.

    ``share=False`` keeps the selected layers unshared (one pass each); ``kd_steps``
    overrides the configuration (0: the raw layers); ``layers`` overrides the layer choice.
    Returns (aux_model, selected_layers, kd_losses); a cached model comes with the losses that made it.
    """
    num_layers = loaded.model.config.num_hidden_layers
    selected = layers or select_layers(num_layers, config.aux_layers, config.aux_layer_choice)
    order = config.aux_layer_order
    design = parse_embedding(config.aux_embedding)
    vocabulary, kd_rows, student_ids = None, server_rows, None
    if design is not None and design[0] != LOWRANK:  # pruned: chosen from the server's rows
        vocab_size = int(loaded.model.get_input_embeddings().weight.shape[0])  # type: ignore[index]
        vocabulary = choose_vocabulary(loaded.tokenizer, server_rows, design[1], vocab_size)
        # distilled on each row up to its first token that is not kept: there the teacher's and the
        # student's positions are the same tokens (what follows a rewritten token is shifted)
        kd_rows = []
        for row in server_rows:
            cut = next((i for i, t in enumerate(row.ids) if t not in vocabulary.position), len(row.ids))
            if cut >= 2:
                kd_rows.append(Encoded(row.ids[:cut], 0))
        student_ids = vocabulary.lookup(vocab_size)
        if not kd_rows:
            raise FedSPError(
                f"--aux-embedding {config.aux_embedding}: no row of the server's shard begins with two kept "
                "tokens, so none can distil the client model; raise V"
            )

    def build() -> PreTrainedModel:
        aux = build_auxiliary_model(loaded.model, selected, share=share, order=order)
        if design is None:
            return aux
        if vocabulary is None:
            return factorise_embedding(aux, design[1])
        return prune_embedding(aux, vocabulary.kept)

    aux = build()
    steps = config.kd_steps if kd_steps is None else kd_steps
    if steps == 0:
        return aux, selected, []
    kd_config = kd_config_from(config, steps)
    model_config = {**loaded.model.config.to_dict(), "weights_dtype": str(loaded.model.dtype)}
    plan = depth_plan(num_layers, len(selected), order) if share else None
    key = cache_key(
        loaded.name, model_config, selected, plan, kd_config, server_rows, config.seed, config.aux_embedding
    )
    path = cache_dir() / "aux" / f"{key}.safetensors"
    if path.is_file():
        try:
            return aux, selected, load_student(aux, path)
        except Exception as err:  # truncated or foreign: say which file, then distil it again
            warnings.warn(
                f"cached auxiliary model {path} cannot be read ({err}); distilling it again", stacklevel=2
            )
            path.unlink(missing_ok=True)
            aux = build()
    losses = distill(
        loaded.model,
        aux,
        kd_rows,
        kd_config,
        loaded.tokenizer.pad_token_id,
        config.seed,
        progress=config.progress,
        student_ids=student_ids,
        kept_ids=None if vocabulary is None else torch.as_tensor(list(vocabulary.kept), dtype=torch.long),
    )
    save_student(aux, path, losses)
    return aux, selected, losses
