"""Model resources: `GET /v1/accounts/{a}/models/{m}` for base models and promoted models.

Recipes read a base model's details (architecture, parameter count) before choosing a shape,
and a promoted checkpoint is a model of the account. Locally the base models are the registry's
(readable under the platform's account and under `fireworks`, where the public models live on
the real platform) and promoted models are those `:promote` wrote.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from backend.control import AccountCheck, ResponseModel
from backend.control.promotion import PromotedModel, PromotionService
from backend.control.shapes import model_facts
from backend.errors import ApiError
from backend.models.registry import REGISTERED_MODELS

__all__ = ["BaseModelResource", "ModelCatalog", "models_router"]

# The account whose models everyone can read on the real platform.
PUBLIC_ACCOUNT = "fireworks"


class BaseModelDetails(ResponseModel):
    model_type: str
    # An int64, which the platform's JSON writes as a string.
    parameter_count: str
    supports_fireattention: bool = False
    world_size: int = 1


class BaseModelResource(ResponseModel):
    name: str
    kind: Literal["HF_BASE_MODEL"] = "HF_BASE_MODEL"
    state: Literal["READY"] = "READY"
    display_name: str
    description: str
    context_length: int
    base_model_details: BaseModelDetails
    supports_lora: bool = True
    tunable: bool = True
    rl_tunable: bool = True
    public: bool = True


class ModelCatalog:
    """Looks a model id up among the registered base models, then the promoted ones."""

    def __init__(self, account_id: str, promotions: PromotionService) -> None:
        self._account_id = account_id
        self._promotions = promotions

    def get(self, account: str, model_id: str) -> BaseModelResource | PromotedModel:
        base = REGISTERED_MODELS.get(model_id)
        if base is not None:
            model_type, parameter_count = model_facts(base)
            return BaseModelResource(
                name=f"accounts/{account}/models/{model_id}",
                display_name=base.hf_name,
                description=base.description,
                context_length=base.context_length,
                base_model_details=BaseModelDetails(
                    model_type=model_type, parameter_count=str(parameter_count)
                ),
            )
        promoted = self._promotions.find(model_id) if account == self._account_id else None
        if promoted is not None:
            return promoted
        known = ", ".join(sorted(REGISTERED_MODELS))
        raise ApiError.not_found(
            f"model accounts/{account}/models/{model_id} not found; base models here: {known}, "
            "and the checkpoints promoted under this account",
            reason="MODEL_NOT_FOUND",
        )


def models_router(catalog: ModelCatalog, check_account: AccountCheck) -> APIRouter:
    """`GET /v1/accounts/{account}/models/{model_id}`."""
    router = APIRouter(prefix="/v1/accounts/{account}/models")

    @router.get("/{model_id}", response_model_exclude_none=True)
    def get_model(account: str, model_id: str) -> BaseModelResource | PromotedModel:
        # Public base models are readable under `fireworks` too; anything else needs the
        # platform's own account, like every other path.
        if account != PUBLIC_ACCOUNT:
            check_account(account)
        return catalog.get(account, model_id)

    return router
