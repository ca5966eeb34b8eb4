"""The LoRA merge by tensor math on the tiny model: bit for bit PEFT's own merge, after any
earlier load into the same standby model (another adapter's layers, a full snapshot), and PEFT
left to merge what it is not (a DoRA adapter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from backend.models.store import ensure_model_dir, resolve_models_dir
from backend.serving import adapter_merge
from backend.serving.generation import DecodingModel
from backend.serving.weights import ModelFactory
from backend.trainer import modeling
from backend.trainer.errors import UserError

ATTN = ["q_proj", "v_proj"]
MLP = ["gate_proj", "down_proj"]


@pytest.fixture(scope="module")
def factory() -> ModelFactory:
    model_dir = ensure_model_dir("tiny", resolve_models_dir(None))
    return ModelFactory(model_dir, torch.device("cpu"), context_length=64)


def _save_adapter(factory: ModelFactory, targets: list[str], seed: int, where: Path) -> Path:
    """A rank-4 adapter of `targets` with random (non-zero) factors, saved as PEFT saves it."""
    model = modeling.load_hf_model(factory.model_dir, torch.device("cpu"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(str(where))
    return where


def _peft_merged(factory: ModelFactory, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """What PEFT's merge makes of the base model and `adapter_dir` (the trainer's merged_base)."""
    model = modeling.load_hf_model(factory.model_dir, torch.device("cpu"))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return {name: t.clone() for name, t in merged.state_dict().items()}


def _assert_serves(model: DecodingModel, expected: dict[str, torch.Tensor]) -> None:
    served = model.module.state_dict()
    assert served.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(served[name], tensor), name


def test_adapters_merge_bit_for_bit_as_peft_whatever_the_standby_held(
    factory: ModelFactory, tmp_path: Path
) -> None:
    attn = _save_adapter(factory, ATTN, seed=1, where=tmp_path / "attn")
    mlp = _save_adapter(factory, MLP, seed=2, where=tmp_path / "mlp")
    model = factory.base()
    factory.adapter(attn, model)
    _assert_serves(model, _peft_merged(factory, attn))
    # The attention layers of the first adapter go back to the base weights: only the MLP's
    # layers differ from the base model now.
    factory.adapter(mlp, model)
    _assert_serves(model, _peft_merged(factory, mlp))
    # After a full snapshot every weight may be off the base: all of them are restored.
    noise = {n: t + 1.0 for n, t in _peft_merged(factory, mlp).items() if n != "lm_head.weight"}
    factory.full(noise, tmp_path, model)
    factory.adapter(attn, model)
    _assert_serves(model, _peft_merged(factory, attn))


def test_a_dora_adapter_is_left_to_peft(factory: ModelFactory, tmp_path: Path) -> None:
    adapter = _save_adapter(factory, ATTN, seed=3, where=tmp_path / "dora")
    assert adapter_merge.plan_merge(adapter) is not None
    config_path = adapter / adapter_merge.ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    assert adapter_merge.plan_merge(adapter) is None
    config_path.write_text(json.dumps({**config, "use_rslora": True}))
    plan = adapter_merge.plan_merge(adapter)
    assert plan is not None and plan.scale == pytest.approx(8 / 2)  # alpha / sqrt(r)


def test_an_adapter_of_another_shape_is_refused_before_any_weight_changes(
    factory: ModelFactory, tmp_path: Path
) -> None:
    adapter = _save_adapter(factory, ATTN, seed=4, where=tmp_path / "misfit")
    plan = adapter_merge.plan_merge(adapter)
    assert plan is not None
    model = factory.base()
    before = {n: t.clone() for n, t in model.module.state_dict().items()}
    first = plan.layers[0]
    wider = adapter_merge.LayerUpdate(
        first.weight_name, torch.cat([first.factor_a, first.factor_a], 1), first.factor_b
    )
    misfit = adapter_merge.MergePlan(plan.scale, (wider, *plan.layers[1:]))
    targets = dict(model.module.state_dict())
    with pytest.raises(UserError, match=first.weight_name.replace(".", r"\.")):
        adapter_merge.check_fits(misfit, targets, adapter)
    _assert_serves(model, before)
