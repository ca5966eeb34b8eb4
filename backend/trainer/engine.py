"""`TrainableModel`: one tinker training run on PyTorch (full-parameter, LoRA or frozen base).

Plain typed Python in and out, no HTTP: the protocol layer decodes JSON into `Datum`s, calls
these methods in seq-id order (the engine is not thread-safe) and maps `UserError` to a
`category: "user"` failure. Every method validates its whole input before touching state, so a
rejected request leaves weights, gradients and counters as they were; the one exception is an
`optim_step` refused because its gradients or its result would be non-finite, which keeps the
weights and optimizer state but drops the gradients (see `optim_step`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch

from backend.trainer import export, modeling, state
from backend.trainer.batching import pack, pad, target_logprobs
from backend.trainer.datum import Datum, validate_datums
from backend.trainer.engine_paths import (
    EnginePlan,
    batched_losses,
    chunked_target_logprobs,
    resolve_engine,
)
from backend.trainer.errors import ServerError, UserError
from backend.trainer.losses import LossFn, LossOutput, get_loss
from backend.trainer.settings import (
    AdamSettings,
    CheckpointType,
    EngineSettings,
    GradNormalization,
    LoraSettings,
)

logger = logging.getLogger(__name__)

# Micro-batch budget: logits are B·T·V fp32 (plus their log-softmax and gradient), so the
# padded-token budget shrinks with the vocabulary: 16,384 tokens for tiny, ~5,400 for SmolLM2.
_MAX_BATCH_TOKENS = 16_384
_MAX_BATCH_LOGITS = 1 << 28


@dataclass(frozen=True)
class ForwardResult:
    """Per datum (input order): target `logprobs` and `elementwise_loss`, each (N,) fp32 CPU,
    plus `name:reduction` metrics."""

    logprobs: list[torch.Tensor]
    elementwise_loss: list[torch.Tensor]
    metrics: dict[str, float]


class TrainableModel:
    """One training run over a base model directory; gradients accumulate until `optim_step`."""

    def __init__(
        self,
        model_dir: Path,
        *,
        base_model: str,
        lora: LoraSettings | None = None,
        base_only: bool = False,
        device: str | torch.device = "cpu",
        context_length: int | None = None,
        max_batch_tokens: int | None = None,
        engine: EngineSettings | None = None,
    ) -> None:
        """Load `model_dir` (an HF causal LM) as fp32 weights on `device`.

        `base_model` is the canonical name recorded in (and checked against) saved states;
        `lora=None` trains every parameter, `base_only` freezes them (forward only).
        `context_length` defaults to the config's `max_position_embeddings`;
        `max_batch_tokens` (padded tokens per micro-batch) to a budget set by the vocabulary.
        `engine` picks the compute path (default: `auto`, the reference fp32 path on CPU).
        """
        if base_only and lora is not None:
            raise UserError("lora_config must be absent for a base_only model")
        self._model_dir = model_dir
        self._base_model = base_model
        self._lora = lora
        self._base_only = base_only
        self._device = torch.device(device)
        hf_model = modeling.load_hf_model(model_dir, self._device)
        self._hf_model = hf_model
        self._plan = resolve_engine(
            engine or EngineSettings(), self._device, str(hf_model.config.model_type)
        )
        self.vocab_size = int(hf_model.config.vocab_size)
        self.context_length = context_length or int(hf_model.config.max_position_embeddings)
        # Chunked log-probs bound each chunk's logits instead (`max_chunk_logits`), so there
        # the vocabulary no longer shrinks the micro-batch.
        vocab_budget = max(self.context_length, _MAX_BATCH_LOGITS // self.vocab_size)
        if self._plan.logprob_chunk:
            vocab_budget = _MAX_BATCH_TOKENS
        self._max_batch_tokens = max_batch_tokens or min(_MAX_BATCH_TOKENS, vocab_budget)
        self._model = modeling.attach_lora(hf_model, lora) if lora else hf_model
        if self._plan.compile:
            modeling.compile_decoder(hf_model)
        if base_only:
            self._model.requires_grad_(False)
        # No dropout anywhere: both custom-loss phases must see identical logprobs.
        self._model.eval()
        self._trainable = [(n, p) for n, p in self._model.named_parameters() if p.requires_grad]
        self._generator = torch.Generator().manual_seed(lora.seed if lora else 0)
        self._optimizer = self._new_optimizer()
        self._step = 0
        self._loss_tokens = 0
        self._sequences = 0
        self._last_export: tuple[Path, export.Tensors] | None = None
        # The memory of the export before the last one: the next save copies the weights into
        # it (two buffer sets swap roles; a save allocates nothing once they exist).
        self._spare_export: export.Tensors | None = None
        logger.info(
            "loaded %s from %s on %s: %s, %d trainable parameters; engine: %s",
            base_model,
            model_dir,
            self._device,
            "base only" if base_only else f"LoRA rank {lora.rank}" if lora else "full-parameter",
            self.num_trainable_params,
            self._plan.describe(),
        )

    @property
    def step(self) -> int:
        """Optimizer steps applied to these weights (restored by `load_state`)."""
        return self._step

    @property
    def engine_plan(self) -> EnginePlan:
        """The compute path this model runs (its settings resolved for its device)."""
        return self._plan

    @property
    def is_lora(self) -> bool:
        return self._lora is not None

    @property
    def lora_rank(self) -> int:
        """The LoRA rank, 0 for a full-parameter or base-only model (tinker's convention)."""
        return self._lora.rank if self._lora else 0

    @property
    def lora_settings(self) -> LoraSettings | None:
        return self._lora

    @property
    def base_model(self) -> str:
        return self._base_model

    @property
    def base_only(self) -> bool:
        return self._base_only

    @property
    def num_trainable_params(self) -> int:
        return sum(p.numel() for _, p in self._trainable)

    def trainable_weights(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable parameters by name (LoRA: the adapter only)."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self._trainable}

    def accumulated_gradients(self) -> dict[str, torch.Tensor]:
        """CPU copies of the gradients accumulated since the last step, by parameter name."""
        return {
            name: p.grad.detach().to("cpu", copy=True)
            for name, p in self._trainable
            if p.grad is not None
        }

    def forward(
        self, datums: Sequence[Datum], loss_fn: str, loss_fn_config: Mapping[str, Any] | None
    ) -> ForwardResult:
        """Logprobs and loss metrics at the current weights; no gradients."""
        return self._run(datums, loss_fn, loss_fn_config, backward=False)

    def forward_backward(
        self, datums: Sequence[Datum], loss_fn: str, loss_fn_config: Mapping[str, Any] | None
    ) -> ForwardResult:
        """Like `forward`, and adds d(summed loss)/d(weights) to the accumulated gradients."""
        if self._base_only:
            raise UserError("this model is base_only (frozen reference): forward_backward refused")
        return self._run(datums, loss_fn, loss_fn_config, backward=True)

    def optim_step(
        self, adam: AdamSettings, normalization: GradNormalization | None = None
    ) -> dict[str, float]:
        """Normalise, clip and apply the accumulated gradients with AdamW, then zero them.

        Never leaves non-finite weights or optimizer state, by refusing (`UserError`) first:
        - non-finite gradients (an overflowing loss): weights and optimizer state unchanged,
          the accumulated gradients dropped (they cannot be used; the next step starts clean);
        - a step that would overflow: a scalar bound from the norms of weights, moments and
          gradients (`_step_bounded`) proves the common step safe; when it cannot, each
          parameter's AdamW update is first computed into a scratch copy of that one parameter
          and checked (`_step_stays_finite`); only if every one is finite does the real step run.
          A copy of the whole model and optimizer state would make any refused step reversible,
          but doubles memory on every step; the dry run costs one parameter's scratch memory and
          one more elementwise pass. On a refusal the
          weights and optimizer state are as before, the (already normalised) gradients dropped.
        A cheap check of the weights after the real step (their norms, then per tensor only if
        one is not finite) catches any disagreement between these checks and torch's kernels:
        that is a `ServerError` (reload a checkpoint).
        """
        optimizer = self._require_optimizer("optim_step")
        params = [p for _, p in self._trainable]
        grads = [p.grad for p in params if p.grad is not None]
        counts = {"num_loss_tokens": self._loss_tokens, "num_sequences": self._sequences}
        divisor = counts.get(normalization or "none", 0)
        if divisor > 0:  # a zero count leaves the gradient unchanged
            for grad in grads:
                grad.div_(divisor)
        # Dividing by a positive count keeps finite gradients finite, so checking after it
        # refuses exactly the same steps; the norm (NaN or inf spread through its sum) proves
        # every gradient finite in one reduction, and only a non-finite norm needs the
        # per-tensor check to tell a non-finite gradient from a sum of squares that overflowed.
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        grad_norm_value = float(grad_norm)
        if not math.isfinite(grad_norm_value) and not _all_finite(grads):
            self._clear_gradients()
            raise UserError(
                "optim_step refused: the accumulated gradients are not finite (NaN or infinite; "
                "check the loss and its weights); weights unchanged, gradients dropped"
            )
        if adam.grad_clip_norm > 0:
            # clip_grad_norm_ is exactly this norm followed by this scaling.
            torch.nn.utils.clip_grads_with_norm_(params, adam.grad_clip_norm, grad_norm)
        if not _step_bounded(optimizer, params, adam, grad_norm_value) and not _step_stays_finite(
            optimizer, params, adam
        ):
            self._clear_gradients()
            raise UserError(
                f"optim_step refused: learning_rate {adam.learning_rate:g} (weight_decay "
                f"{adam.weight_decay:g}, eps {adam.eps:g}) would make the weights non-finite; "
                "weights unchanged, gradients dropped"
            )
        for group in optimizer.param_groups:
            # Hyper-parameters may change every step; AdamW's bias correction uses its own step.
            group.update(
                lr=adam.learning_rate,
                betas=(adam.beta1, adam.beta2),
                eps=adam.eps,
                weight_decay=adam.weight_decay,
            )
        optimizer.step()
        if not all(math.isfinite(n) for n in _norms(params)) and not _all_finite(params):
            raise ServerError("optim_step produced non-finite weights; reload the last checkpoint")
        metrics = {
            "grad_norm:mean": grad_norm_value,
            "learning_rate:mean": adam.learning_rate,
            "num_loss_tokens:sum": float(self._loss_tokens),
            "num_sequences:sum": float(self._sequences),
        }
        self._clear_gradients()
        self._step += 1
        return metrics

    def save_state(self, directory: Path, *, overwrite: bool = False) -> None:
        """Write trainable weights, AdamW state, step, LoRA settings and RNG state atomically."""
        optimizer = self._require_optimizer("save_state")
        optimizer_state = {
            name: {key: value.detach().cpu() for key, value in optimizer.state[p].items()}
            for name, p in self._trainable
            if p in optimizer.state
        }
        meta = state.StateMeta(
            base_model=self._base_model,
            step=self._step,
            lora=self._lora,
            has_optimizer=True,
            rng_state=self._generator.get_state().tolist(),
        )
        weights = {name: p.detach().cpu() for name, p in self._trainable}
        state.write_state(directory, meta, weights, optimizer_state, overwrite=overwrite)

    def load_state(self, directory: Path, *, with_optimizer: bool) -> None:
        """Replace the trainable weights (and AdamW state if asked, else reset it) from a
        complete `save_state` directory; clears accumulated gradients."""
        self._require_optimizer("load_state")
        saved = state.read_state(directory, with_optimizer=with_optimizer)
        state.check_compatible(
            saved, directory=directory, base_model=self._base_model, lora=self._lora
        )
        state.check_shapes(saved, directory=directory, trainable=dict(self._trainable))
        with torch.no_grad():
            for name, p in self._trainable:
                p.copy_(saved.weights[name])
        self._optimizer = optimizer = self._require_optimizer("load_state", fresh=True)
        fused = self._plan.optimizer == "fused"
        if saved.optimizer is not None:
            for name, p in self._trainable:
                if name in saved.optimizer:
                    # Moments follow the param; `step` stays a CPU scalar as the single-tensor
                    # and foreach kernels keep it, the fused kernel wants it on the device.
                    optimizer.state[p] = {
                        key: value if key == "step" and not fused else value.to(p.device)
                        for key, value in saved.optimizer[name].items()
                    }
        self._step = saved.meta.step
        self._generator.set_state(torch.tensor(saved.meta.rng_state, dtype=torch.uint8))
        self._clear_gradients()

    def load_adapter(self, directory: Path) -> None:
        """Load HF PEFT adapter weights into this LoRA model (weights only; optimizer reset)."""
        if self._lora is None:
            raise UserError("load_adapter needs a LoRA model; this model is full-parameter")
        current = {name: p for name, p in self._trainable}
        weights = modeling.read_adapter(directory, self._lora, current)
        with torch.no_grad():
            for name, tensor in weights.items():
                current[name].copy_(tensor)
        self._optimizer = self._require_optimizer("load_adapter", fresh=True)
        self._clear_gradients()

    def export_for_sampler(
        self,
        directory: Path,
        checkpoint_type: CheckpointType = "base",
        previous: Path | None = None,
        *,
        export_dtype: torch.dtype | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write a sampler snapshot (what a deployment hotloads) named by the directory.

        LoRA: `base` = the PEFT adapter, `merged_base` = adapter folded into full weights.
        Full-parameter: `base` = full weights, `delta` = XOR against `previous` (a snapshot of
        this run). `export_dtype` defaults to the serving dtype: float32 on CPU, bf16 on CUDA.
        """
        dtype = export_dtype or (torch.bfloat16 if self._device.type == "cuda" else torch.float32)
        meta: dict[str, Any] = {
            "checkpoint_type": checkpoint_type,
            "base_model": self._base_model,
            "step": self._step,
            "dtype": export.dtype_name(dtype),
        }
        if self._lora is not None and checkpoint_type == "base":
            meta.update(format="peft_adapter", dtype=export.dtype_name(self._trainable[0][1].dtype))
            write = partial(modeling.save_adapter, self._model)
            export.write_snapshot(directory, meta, write, overwrite=overwrite)
            return directory
        if checkpoint_type == "merged_base" and self._lora is None:
            raise UserError("checkpoint_type 'merged_base' needs a LoRA model; use 'base'")
        if checkpoint_type == "delta" and self._lora is not None:
            raise UserError("checkpoint_type 'delta' is for full-parameter models; use 'base'")
        if checkpoint_type == "delta" and previous is None:
            raise UserError("checkpoint_type 'delta' needs the previous sampler snapshot")
        merge_lora = checkpoint_type == "merged_base"
        # Taken, not borrowed: after a failure below it may hold half a copy or a delta.
        spare, self._spare_export = self._spare_export, None
        replaced = self._last_export
        tensors = modeling.full_tensors(
            self._model, dtype, merge_lora=merge_lora, into=None if merge_lora else spare
        )
        config_json = modeling.config_json(self._hf_model, dtype)
        if previous is not None and checkpoint_type == "delta":
            delta = self._delta_against(previous, tensors)
            meta.update(export.delta_meta(tensors, previous.name))
            weights, write_weights = delta, export.write_delta_weights
        else:
            meta["format"] = "hf"
            weights, write_weights = tensors, export.write_full_weights
        write = partial(
            write_weights, weights=weights, config_json=config_json, model_dir=self._model_dir
        )
        export.write_snapshot(directory, meta, write, overwrite=overwrite)
        if checkpoint_type == "merged_base":
            self._spare_export = spare
        else:
            self._last_export = (directory.resolve(), tensors)
            # The replaced export's memory (now its weights or this delta's bits) is written
            # and no longer read: the next save copies into it.
            self._spare_export = replaced[1] if replaced is not None else None
        return directory

    def _run(
        self,
        datums: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, Any] | None,
        *,
        backward: bool,
    ) -> ForwardResult:
        loss = get_loss(loss_fn)
        config = loss.parse_config(loss_fn_config)
        validate_datums(datums, context_length=self.context_length, vocab_size=self.vocab_size)
        for index, datum in enumerate(datums):
            loss.check_inputs(datum.loss_fn_inputs, f"data[{index}]")
        results: dict[int, tuple[torch.Tensor, LossOutput]] = {}
        for group in pack([d.num_tokens for d in datums], self._max_batch_tokens):
            with torch.set_grad_enabled(backward):
                outputs = self._group_losses([datums[i] for i in group], loss, config)
                if backward:
                    total = torch.stack([out.loss for _, out in outputs]).sum()
                    torch.autograd.backward(total)
            results.update(zip(group, map(_detached, outputs), strict=True))
        ordered = [results[i] for i in range(len(datums))]
        loss_tokens = sum(int(loss.loss_token_mask(d.loss_fn_inputs).sum()) for d in datums)
        if backward:
            self._loss_tokens += loss_tokens
            self._sequences += len(datums)
        return ForwardResult(
            logprobs=[lp_N for lp_N, _ in ordered],
            elementwise_loss=[out.loss_N for _, out in ordered],
            metrics=_metrics(datums, [out for _, out in ordered], loss_tokens),
        )

    def _group_losses(
        self, datums: Sequence[Datum], loss: LossFn[Any], config: Any
    ) -> list[tuple[torch.Tensor, LossOutput]]:
        """Per datum of one micro-batch: its target logprobs and loss (graph kept for backward)."""
        lp_BT = self._target_logprobs(datums)
        if self._plan.batched_losses:
            return batched_losses(loss, config, lp_BT, datums, self._device)
        logprobs = [lp_BT[b, : d.num_tokens] for b, d in enumerate(datums)]
        results = []
        for lp_N, datum in zip(logprobs, datums, strict=True):
            inputs = {k: v.to(self._device) for k, v in datum.loss_fn_inputs.items()}
            results.append((lp_N, loss(lp_N, inputs, config)))
        return results

    def _target_logprobs(self, datums: Sequence[Datum]) -> torch.Tensor:
        """(B, T) fp32 target logprobs of right-padded `datums`, by this plan's path."""
        batch = pad(datums, self._device)
        if not self._plan.logprob_chunk:
            return target_logprobs(self._model, batch, self._plan.autocast(self._device))
        decoder, head = modeling.decoder_and_head(self._hf_model)
        return chunked_target_logprobs(
            decoder,
            head,
            batch.tokens_BT,
            batch.targets_BT,
            batch.attention_mask,
            chunk=self._plan.logprob_chunk,
            max_chunk_logits=_MAX_BATCH_LOGITS,
            autocast=partial(self._plan.autocast, self._device),
        )

    def _delta_against(self, previous: Path, tensors: export.Tensors) -> export.Tensors:
        """`tensors` XOR snapshot `previous`'s: computed over the last export's own copy when it
        is that snapshot (which leaves the cache: one model-sized allocation less), else
        against the snapshot read from disk."""
        cached, self._last_export = self._last_export, None
        if cached is not None and cached[0] == previous.resolve():
            return export.xor_delta(tensors, cached[1], in_place=True)
        return export.xor_delta(tensors, export.load_snapshot_tensors(previous))

    def _new_optimizer(self) -> torch.optim.AdamW | None:
        if self._base_only:
            return None
        # Hyper-parameters are set from each optim_step request.
        return self._plan.new_adamw([p for _, p in self._trainable])

    def _require_optimizer(self, operation: str, *, fresh: bool = False) -> torch.optim.AdamW:
        optimizer = self._new_optimizer() if fresh else self._optimizer
        if optimizer is None:
            raise UserError(f"this model is base_only (frozen reference): {operation} refused")
        return optimizer

    def _clear_gradients(self) -> None:
        for _, p in self._trainable:
            p.grad = None
        self._loss_tokens = 0
        self._sequences = 0


def _detached(output: tuple[torch.Tensor, LossOutput]) -> tuple[torch.Tensor, LossOutput]:
    """CPU fp32 copies without the graph, so a micro-batch's activations are freed at once."""
    lp_N, loss = output
    metrics = {key: value.detach().cpu() for key, value in loss.metrics.items()}
    cpu_loss = LossOutput(loss.loss_N.detach().float().cpu(), metrics)
    return lp_N.detach().float().cpu(), cpu_loss


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """One fused reduction per tensor; no tensor-sized temporaries kept."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@torch.no_grad()
def _step_stays_finite(
    optimizer: torch.optim.AdamW, params: Sequence[torch.nn.Parameter], adam: AdamSettings
) -> bool:
    """Whether AdamW's next step keeps every parameter and moment finite, computed one
    parameter at a time, so the scratch memory is a few copies of the largest parameter."""
    for p in params:
        if p.grad is None:
            continue
        try:
            finite = _param_step_stays_finite(optimizer.state.get(p, {}), p, p.grad, adam)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, OverflowError):  # a factor beyond float range: torch refuses it
            return False
        if not finite:
            return False
    return True


def _param_step_stays_finite(
    state: Mapping[str, torch.Tensor], p: torch.Tensor, grad: torch.Tensor, adam: AdamSettings
) -> bool:
    """One parameter's AdamW step on scratch copies (torch's single-tensor AdamW, op for op)."""
    beta1, beta2 = adam.beta1, adam.beta2
    step = float(state["step"]) + 1 if "step" in state else 1.0
    exp_avg = state["exp_avg"].clone() if "exp_avg" in state else torch.zeros_like(p)
    exp_avg_sq = state["exp_avg_sq"].clone() if "exp_avg_sq" in state else torch.zeros_like(p)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(adam.eps)
    new_p = p.mul(1 - adam.learning_rate * adam.weight_decay)
    new_p.addcdiv_(exp_avg, denom, value=-adam.learning_rate / (1 - beta1**step))
    return _all_finite([new_p, exp_avg, exp_avg_sq])


def _norms(tensors: Sequence[torch.Tensor]) -> list[float]:
    """Each tensor's L2 norm, from one multi-tensor reduction and one device sync. NaN and inf
    spread through the sum of squares, so a finite norm proves its tensor finite; a non-finite
    one may also be a finite tensor whose sum of squares overflowed."""
    if not tensors:
        return []
    norms = torch._foreach_norm(list(tensors))
    return cast(list[float], torch.stack([n.float() for n in norms]).tolist())


# The scalar bound below must stay this far under the dtype's largest value: room for the
# rounding of the norms it starts from, so a bound that passes is a proof, not an estimate.
_BOUND_MARGIN = 2.0**20


def _step_bounded(
    optimizer: torch.optim.AdamW,
    params: Sequence[torch.nn.Parameter],
    adam: AdamSettings,
    grad_norm: float,
) -> bool:
    """Whether a scalar bound proves AdamW's next step keeps weights and moments finite.

    From the norms (each >= its tensor's largest |value|) of weights P, first moments M and
    second moments V, and G = the pre-clip gradient norm (clipping only shrinks gradients), in
    float64, every intermediate of torch's AdamW is bounded: the new first moment by
    max(M, G) =: Mx (a convex mix; the lerp's difference by 2*Mx), the second by V + G^2, the
    denominator sqrt(v / (1 - beta2^t)) + eps by sqrt((V + G^2) / (1 - beta2)) + eps, the
    ratio m / denominator by Mx / eps, the update by |lr| / (1 - beta1) * Mx / eps (the bias
    corrections are smallest at t = 1), and the new weights by P * |1 - lr * wd| + update.
    False means "not proven" (the caller runs the exact per-parameter dry run), never "unsafe".
    """
    stepped = [p for p in params if p.grad is not None]
    if not stepped:
        return True
    beta1, beta2, eps = adam.beta1, adam.beta2, adam.eps
    lr, wd = adam.learning_rate, adam.weight_decay
    dtypes = {p.dtype for p in stepped}
    if len(dtypes) != 1 or not all(math.isfinite(x) for x in (lr, wd, eps, beta1, beta2)):
        return False
    finfo = torch.finfo(dtypes.pop())
    # eps must survive rounding to the weights' dtype, or the denominator could be zero.
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and eps >= finfo.tiny):
        return False
    states = [optimizer.state.get(p, {}) for p in stepped]
    exp_avgs = [s["exp_avg"] for s in states if "exp_avg" in s]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states if "exp_avg_sq" in s]
    norms = _norms(stepped + exp_avgs + exp_avg_sqs)
    n, k = len(stepped), len(exp_avgs)
    weights = max(norms[:n])
    first = max(norms[n : n + k], default=0.0)
    second = max(norms[n + k :], default=0.0)
    m1 = max(first, grad_norm)
    v1 = second + grad_norm * grad_norm
    denominator = math.sqrt(v1 / (1.0 - beta2)) + eps
    ratio = m1 / eps
    update = abs(lr) / (1.0 - beta1) * ratio
    new_weights = weights * abs(1.0 - lr * wd) + update
    limit = finfo.max / _BOUND_MARGIN
    # NaN anywhere fails every comparison: not proven.
    return all(x < limit for x in (2.0 * m1, v1, denominator, ratio, update, new_weights))


def _metrics(
    datums: Sequence[Datum], outputs: Sequence[LossOutput], loss_tokens: int
) -> dict[str, float]:
    metrics = {
        "loss:sum": float(sum(float(out.loss) for out in outputs)),
        "num_tokens:sum": float(sum(d.num_tokens for d in datums)),
        "num_loss_tokens:sum": float(loss_tokens),
        "num_sequences:sum": float(len(datums)),
    }
    # Per-datum extras (clip_frac, ratio_mean) average over datums, as the client's `mean`
    # reduction weights chunks by their datum counts.
    for key in outputs[0].metrics:
        metrics[f"{key}:mean"] = float(torch.stack([out.metrics[key] for out in outputs]).mean())
    return metrics
