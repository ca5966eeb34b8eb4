"""The trainer's operations as they run on a job's worker thread: typed commands in, typed results
out (the routes decoded the request and will encode the result for the client's dialect).

Each function checks what its command's shape cannot (a bad datum or hyper-parameter fails as a
user error, having consumed its sequence id), calls the engine, persists what must outlive the
process (checkpoints and snapshots, written atomically by the engine) and tells the control plane
about it (`record_checkpoint`, `record_optim_step`). This module imports torch and the engine,
so the service imports it only when a job first needs it.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

from pydantic import ValidationError

from backend.errors import describe_validation_errors
from backend.models.registry import UnknownModelError, canonical_model_name, max_lora_rank
from backend.models.store import ensure_model_dir
from backend.trainer import sampling
from backend.trainer.checkpoints import CheckpointStore, validate_name
from backend.trainer.datum import decode_datum, encode_tensor_data
from backend.trainer.engine import TrainableModel
from backend.trainer.errors import UserError
from backend.trainer.job import CheckpointRowType, JobContext, ModelEntry, check_lora_capacity
from backend.trainer.samplers import SamplerInfo
from backend.trainer.sampling import SamplerCache
from backend.trainer.settings import DEFAULT_LORA_ALPHA, AdamSettings, CheckpointType, LoraSettings
from backend.trainer.wire import (
    CreateModelRequest,
    CreateModelResult,
    ForwardBackwardOutput,
    ForwardBackwardRequest,
    ForwardRequest,
    JsonDict,
    LoadAdapterRequest,
    LoadAdapterResult,
    LoadWeightsRequest,
    LoadWeightsResult,
    OptimStepRequest,
    OptimStepResult,
    SampleRequest,
    SampleResult,
    SaveForSamplerRequest,
    SaveForSamplerResult,
    SaveWeightsRequest,
    SaveWeightsResult,
    TensorDataWire,
)

logger = logging.getLogger(__name__)

# Firetitan `adam_params` keys that select metrics, not optimizer hyper-parameters.
_METRIC_KEYS = ("emit_grad_norm_metrics",)
_CHECKPOINT_TYPES: tuple[CheckpointType, ...] = ("base", "delta", "merged_base")


def resolve_device(setting: str) -> str:
    """`auto` → `cuda` when a GPU is present, else `cpu`; anything else as given."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    ctx: JobContext, entry: ModelEntry, request: CreateModelRequest
) -> CreateModelResult:
    """Build the engine for a `create_model` after checking it fits this job."""
    try:
        _check_base_model(ctx, request.base_model)
        lora = _lora_settings(ctx, request)
        model_dir = ensure_model_dir(ctx.base_model, ctx.host.models_dir)
        if lora is not None:
            _check_lora_rank(lora.rank, model_dir)
        entry.engine = TrainableModel(
            model_dir,
            base_model=ctx.base_model,
            lora=lora,
            base_only=request.base_only,
            device=resolve_device(ctx.device),
            context_length=ctx.context_length,
            engine=ctx.engine,
        )
    except BaseException as exc:
        entry.failure = str(exc)
        raise
    logger.info(
        "job %s: loaded model %s (%s, %d trainable parameters)",
        ctx.job_id,
        entry.model_id,
        "base only" if request.base_only else f"lora_rank={entry.lora_rank}",
        entry.engine.num_trainable_params,
    )
    return CreateModelResult(model_id=entry.model_id)


def forward(
    ctx: JobContext, entry: ModelEntry, request: ForwardRequest | ForwardBackwardRequest
) -> ForwardBackwardOutput:
    """`forward` / `forward_backward`: per-datum logprobs, loss metrics; gradients accumulate."""
    backward = isinstance(request, ForwardBackwardRequest)
    loss_input = (
        request.forward_backward_input
        if isinstance(request, ForwardBackwardRequest)
        else request.forward_input
    )
    engine = entry.require_engine()
    datums = [decode_datum(datum, index) for index, datum in enumerate(loss_input.data)]
    run = engine.forward_backward if backward else engine.forward
    result = run(datums, loss_input.loss_fn, loss_input.loss_fn_config)
    outputs = [
        {
            "logprobs": TensorDataWire.model_validate(encode_tensor_data(lp)),
            "elementwise_loss": TensorDataWire.model_validate(encode_tensor_data(loss)),
        }
        for lp, loss in zip(result.logprobs, result.elementwise_loss, strict=True)
    ]
    return ForwardBackwardOutput(loss_fn_outputs=outputs, metrics=dict(result.metrics))


def optim_step(ctx: JobContext, entry: ModelEntry, request: OptimStepRequest) -> OptimStepResult:
    """Apply the accumulated gradients; report the step count to the control plane."""
    hyper = {k: v for k, v in request.adam_params.items() if k not in _METRIC_KEYS}
    try:
        adam = AdamSettings.model_validate(hyper)
    except ValidationError as exc:
        errors = [
            error | {"loc": ("adam_params", *error["loc"])}
            for error in exc.errors(include_url=False)
        ]
        raise UserError(describe_validation_errors(errors)) from None
    engine = entry.require_engine()
    metrics = engine.optim_step(adam, request.grad_accumulation_normalization)
    # May preempt this very job (scheduled fault injection): the step is applied, its result
    # is then lost with the trainer, exactly as with a real preemption after the step.
    ctx.host.record_optim_step(ctx.job_id, engine.step)
    return OptimStepResult(metrics=metrics)


def save_weights(
    ctx: JobContext, entry: ModelEntry, request: SaveWeightsRequest
) -> SaveWeightsResult:
    """Save weights + optimizer state as a resumable checkpoint of the job."""
    engine = entry.require_engine()
    name = validate_name(request.path or f"step-{engine.step}")
    with ctx.checkpoints.relative_errors():
        engine.save_state(ctx.checkpoints.state_dir(ctx.job_id, name), overwrite=request.overwrite)
    row_type: CheckpointRowType = (
        "CHECKPOINT_TYPE_TRAINING_LORA" if engine.is_lora else "CHECKPOINT_TYPE_TRAINING"
    )
    ctx.host.record_checkpoint(ctx.job_id, name, row_type)
    return SaveWeightsResult(path=CheckpointStore.state_uri(ctx.job_id, name))


def load_weights(
    ctx: JobContext, entry: ModelEntry, request: LoadWeightsRequest
) -> LoadWeightsResult:
    """Replace the weights (and optimizer state if asked) from a checkpoint reference."""
    if request.weights_access_token is not None:
        raise UserError("weights_access_token is not supported by the local trainer")
    engine = entry.require_engine()
    ref = ctx.checkpoints.resolve(request.path, job_id=ctx.job_id, model_owner=ctx.model_owner)
    if ref.kind != "state":
        raise UserError(f"path {request.path!r} is a sampler snapshot, not a training state")
    if not ref.path.is_dir():
        raise UserError(_missing_checkpoint(ctx, ref.job_id, ref.name, request.path))
    with ctx.checkpoints.relative_errors():
        engine.load_state(ref.path, with_optimizer=request.optimizer)
    logger.info("job %s: %s loaded %s (step %d)", ctx.job_id, entry.model_id, ref.path, engine.step)
    return LoadWeightsResult(path=request.path)


def save_weights_for_sampler(
    ctx: JobContext, entry: ModelEntry, request: SaveForSamplerRequest
) -> SaveForSamplerResult:
    """Export a sampler snapshot of the job, for a deployment to hotload."""
    if request.path is None:
        return _ephemeral_snapshot(ctx, entry, request)
    engine = entry.require_engine()
    name = validate_name(request.path, "snapshot name")
    kind = _checkpoint_type(request.checkpoint_type)
    previous = entry.last_snapshot if kind == "delta" else None
    directory = ctx.checkpoints.snapshot_dir(ctx.job_id, name)
    if previous is not None and previous.resolve() == directory.resolve():
        raise UserError(
            f"snapshot name {name!r} is the base of this delta: replacing it would leave the "
            "delta without its base; save the delta under a new name"
        )
    # A re-used snapshot name replaces the old snapshot (atomically, once the new one is
    # complete), as the published SDK expects: it only warns that it is overwriting.
    with ctx.checkpoints.relative_errors():
        engine.export_for_sampler(directory, kind, previous, overwrite=True)
    if kind != "merged_base":  # a merged export never starts or continues a delta chain
        entry.last_snapshot = directory
    ctx.host.record_checkpoint(ctx.job_id, name, _snapshot_row_type(kind, engine.is_lora))
    # Firetitan clients (which send checkpoint_type) get the name itself: path == snapshot name
    # == hotload identity. Stock tinker clients get a tinker path they can sample from.
    path = name if request.checkpoint_type is not None else _sampler_uri(ctx.job_id, name)
    return SaveForSamplerResult(path=path)


def _ephemeral_snapshot(
    ctx: JobContext, entry: ModelEntry, request: SaveForSamplerRequest
) -> SaveForSamplerResult:
    """Stock `save_weights_and_get_sampling_client`: a snapshot read by a new sampling session."""
    if request.sampling_session_seq_id is None:
        raise UserError("save_weights_for_sampler without a path needs sampling_session_seq_id")
    engine = entry.require_engine()
    name = f"ephemeral-{uuid.uuid4().hex[:12]}"
    engine.export_for_sampler(ctx.checkpoints.snapshot_dir(ctx.job_id, name), "base")
    # Not a named save: no checkpoint row, and it does not join the model's delta chain.
    sampler_id = ctx.register_sampler(
        entry.session_id, request.sampling_session_seq_id, _sampler_uri(ctx.job_id, name)
    )
    return SaveForSamplerResult(sampling_session_id=sampler_id)


def load_adapter(
    ctx: JobContext, entry: ModelEntry, request: LoadAdapterRequest
) -> LoadAdapterResult:
    """Load HF PEFT adapter weights into a LoRA model (weights only; optimizer reset)."""
    engine = entry.require_engine()
    adapter_dir = Path(request.adapter_path)
    if not adapter_dir.is_absolute():
        raise UserError(f"adapter_path {request.adapter_path!r} must be an absolute directory")
    adapter_dir = ctx.checkpoints.inside(
        adapter_dir, request.adapter_path, what="adapter_path", model_cache=True
    )
    with ctx.checkpoints.relative_errors():
        engine.load_adapter(adapter_dir)
    return LoadAdapterResult(model_id=entry.model_id, adapter_path=request.adapter_path)


def state_info(directory: Path) -> JsonDict:
    """`weights_info` of a saved training state: base model and LoRA shape."""
    from backend.trainer.state import StateMeta  # reads only the small JSON, not the tensors

    meta = StateMeta.model_validate(json.loads((directory / "state.json").read_text()))
    lora = meta.lora
    return {
        "base_model": meta.base_model,
        "is_lora": lora is not None,
        "lora_rank": lora.rank if lora else 0,
        "train_unembed": lora.train_unembed if lora else None,
        "train_mlp": lora.train_mlp if lora else None,
        "train_attn": lora.train_attn if lora else None,
    }


# -- helpers -------------------------------------------------------------------------------


def _check_base_model(ctx: JobContext, requested: str) -> None:
    try:
        name = canonical_model_name(requested)
    except UnknownModelError as exc:
        raise UserError(f"base_model: {exc}") from None
    if name != ctx.base_model:
        raise UserError(
            f"base_model {requested!r} does not match this trainer job's base model "
            f"{ctx.base_model!r} (a trainer serves one base model)"
        )


def _lora_settings(ctx: JobContext, request: CreateModelRequest) -> LoraSettings | None:
    config = request.lora_config
    if request.base_only:
        if config is not None and config.rank > 0:
            raise UserError("base_only models take no lora_config (they are frozen)")
        return None
    rank = config.rank if config is not None else 0
    check_lora_capacity(rank, ctx.lora_rank)  # also checked at create_model, answered 400
    if config is None or rank == 0:
        return None
    return LoraSettings(
        rank=rank,
        alpha=config.alpha if config.alpha is not None else DEFAULT_LORA_ALPHA,
        seed=config.seed if config.seed is not None else 0,
        train_mlp=config.train_mlp,
        train_attn=config.train_attn,
        train_unembed=config.train_unembed,
    )


def _check_lora_rank(rank: int, model_dir: Path) -> None:
    """Refuse a rank above the model's smallest adapted width, read from its config (a larger
    one adds parameters without adding rank, and a huge one exhausts memory)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    limit = max_lora_rank(config)
    if rank > limit:
        raise UserError(
            f"lora_rank {rank} is larger than this model allows: at most {limit} "
            "(its smallest adapted layer width)"
        )


def _checkpoint_type(value: str | None) -> CheckpointType:
    if value is None:
        return "base"
    for kind in _CHECKPOINT_TYPES:
        if value.strip().lower() == kind:
            return kind
    raise UserError(f"checkpoint_type must be one of {', '.join(_CHECKPOINT_TYPES)}, got {value!r}")


def _snapshot_row_type(kind: CheckpointType, is_lora: bool) -> CheckpointRowType:
    if kind == "delta":
        return "CHECKPOINT_TYPE_INFERENCE_ARC_V2"
    if kind == "base" and is_lora:
        return "CHECKPOINT_TYPE_INFERENCE_LORA"
    return "CHECKPOINT_TYPE_INFERENCE_BASE"


def _sampler_uri(job_id: str, name: str) -> str:
    return f"tinker://{job_id}/sampler_weights/{name}"


def _missing_checkpoint(ctx: JobContext, job_id: str | None, name: str, path: str) -> str:
    if job_id is None:
        return f"path {path!r}: no checkpoint directory there"
    saved = ctx.checkpoints.list_states(job_id)
    listing = ", ".join(saved[-5:]) if saved else "none"
    return f"no checkpoint {name!r} in trainer job {job_id!r} (its latest checkpoints: {listing})"


def new_sampler_cache(ctx: JobContext) -> SamplerCache:
    """The job's cache of loaded sampler models (built on its first `asample`)."""
    return SamplerCache(
        ensure_model_dir(ctx.base_model, ctx.host.models_dir), resolve_device(ctx.device)
    )


def sample(
    ctx: JobContext, cache: SamplerCache, info: SamplerInfo, request: SampleRequest
) -> SampleResult:
    """`asample`: sequences (and prompt logprobs if asked) from the sampler's weights."""
    with ctx.checkpoints.relative_errors():
        model = cache.get(info)
    return sampling.sample(model, request, ctx.context_length)
