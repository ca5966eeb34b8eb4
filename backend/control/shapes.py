"""Training shapes (the shape-version routes): one validated shape version per base model.

On the real platform a shape fixes the trainer image, accelerators and context length of a
trainer job; locally it is derived from the model registry, so `resolve_training_profile` and the
shape launch path of trainer creation work unchanged against the local platform.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from backend.control import AccountCheck, ResponseModel
from backend.errors import ApiError
from backend.models.registry import REGISTERED_MODELS, LocalModelSpec, canonical_model_name

SHAPE_VERSION = "1"
_SHAPE_REF = re.compile(
    r"^accounts/(?P<account>[^/]+)/trainingShapes/(?P<shape>[^/]+)(/versions/(?P<version>[^/]+))?$"
)
_LATEST_VALIDATED = "latest_validated=true"


class ShardingScheme(ResponseModel):
    pipeline_parallelism: int = 1


class ShapeSnapshot(ResponseModel):
    """What a trainer launched with this shape runs on."""

    trainer_image_tag: str
    deployment_image_tag: str
    max_supported_context_length: int
    node_count: int
    accelerator_type: str
    accelerator_count: int
    trainer_mode: str
    base_model: str
    trainer_sharding_scheme: ShardingScheme
    deployment_shape_version: str


class TrainingShapeVersion(ResponseModel):
    name: str
    snapshot: ShapeSnapshot
    latest_validated: bool = True


class TrainingShapeVersionList(ResponseModel):
    training_shape_versions: list[TrainingShapeVersion]
    next_page_token: str | None = None


class TrainingShapeCatalog:
    """The shapes of one account, keyed by shape id (`<model>-cpu`)."""

    def __init__(self, account_id: str) -> None:
        self.account_id = account_id
        self._models = {model.training_shape_id: model for model in REGISTERED_MODELS.values()}

    def model_for(self, shape_id: str) -> LocalModelSpec:
        model = self._models.get(shape_id)
        if model is None:
            known = ", ".join(sorted(self._models))
            raise ApiError.not_found(
                f"training shape {shape_id!r} not found; the local platform has: {known}",
                reason="TRAINING_SHAPE_NOT_FOUND",
            )
        return model

    def version(self, shape_id: str, version: str) -> TrainingShapeVersion:
        model = self.model_for(shape_id)
        if version != SHAPE_VERSION:
            raise ApiError.not_found(
                f"training shape {shape_id!r} has no version {version!r} (only {SHAPE_VERSION!r})",
                reason="TRAINING_SHAPE_VERSION_NOT_FOUND",
            )
        return self._describe(model)

    def versions(self, shape_id: str, filter_expr: str) -> TrainingShapeVersionList:
        # Each local shape has exactly one version, which is validated: both the unfiltered list
        # and `latest_validated=true` (what the SDK sends) are that one version.
        if filter_expr.replace(" ", "") not in {"", _LATEST_VALIDATED}:
            raise ApiError.invalid_argument(
                f"filter {filter_expr!r} is not supported; use {_LATEST_VALIDATED!r} or none"
            )
        return TrainingShapeVersionList(
            training_shape_versions=[self.version(shape_id, SHAPE_VERSION)]
        )

    def check_ref(self, ref: str, base_model: str) -> None:
        """A `trainingShape` of trainer creation must exist here and fit the job's base model."""
        match = _SHAPE_REF.match(ref)
        if match is None:
            raise ApiError.invalid_argument(
                f"trainingShape {ref!r} is invalid: expected "
                "accounts/<account>/trainingShapes/<shape>[/versions/<version>]"
            )
        if match["account"] != self.account_id:
            raise ApiError.invalid_argument(
                f"trainingShape {ref!r} belongs to account {match['account']!r}, "
                f"not {self.account_id!r}"
            )
        shape = self.version(match["shape"], match["version"] or SHAPE_VERSION)
        wanted = canonical_model_name(base_model)
        if canonical_model_name(shape.snapshot.base_model) != wanted:
            raise ApiError.invalid_argument(
                f"trainingShape {ref!r} is for base model {shape.snapshot.base_model!r}, "
                f"but trainingConfig.baseModel is {base_model!r}"
            )

    def _describe(self, model: LocalModelSpec) -> TrainingShapeVersion:
        account = self.account_id
        return TrainingShapeVersion(
            name=f"accounts/{account}/trainingShapes/{model.training_shape_id}"
            f"/versions/{SHAPE_VERSION}",
            snapshot=ShapeSnapshot(
                trainer_image_tag="local",
                deployment_image_tag="local",
                max_supported_context_length=model.context_length,
                node_count=1,
                # The local trainer runs wherever torch runs; naming the device would mean
                # importing torch in the control plane, so the shape says CPU.
                accelerator_type="CPU",
                accelerator_count=1,
                trainer_mode="POLICY_TRAINER",
                base_model=model.hf_name,
                trainer_sharding_scheme=ShardingScheme(pipeline_parallelism=1),
                deployment_shape_version=f"accounts/{account}/deploymentShapes/"
                f"{model.name}-local/versions/{SHAPE_VERSION}",
            ),
        )


def shapes_router(catalog: TrainingShapeCatalog, check_account: AccountCheck) -> APIRouter:
    """Latest-version and version routes under `/v1/accounts/{account}/trainingShapes`."""
    router = APIRouter(
        prefix="/v1/accounts/{account}/trainingShapes", dependencies=[Depends(check_account)]
    )

    @router.get("/{shape_id}/versions", response_model_exclude_none=True)
    def list_shape_versions(
        shape_id: str,
        filter_expr: Annotated[str, Query(alias="filter")] = "",
        page_size: Annotated[int, Query(alias="pageSize", ge=0)] = 0,
    ) -> TrainingShapeVersionList:
        return catalog.versions(shape_id, filter_expr)

    @router.get("/{shape_id}/versions/{version}", response_model_exclude_none=True)
    def get_shape_version(shape_id: str, version: str) -> TrainingShapeVersion:
        return catalog.version(shape_id, version)

    return router
