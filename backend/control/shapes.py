"""Training and deployment shapes (the shape-version routes), derived from the model registry.

On the real platform a shape fixes the trainer image, accelerators and context length of a
trainer job (or the serving set-up of a deployment); locally there is one validated version per
base model and trainer mode, so `resolve_training_profile`, the shape launch path of trainer
creation and the recipes' shape selection (filtered listings under the wildcard parent
`accounts/-/trainingShapes/-`) work unchanged against the local platform.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Depends, Query

from backend.control import AccountCheck, ResponseModel
from backend.control.filters import FieldKind, FilterTerm, FilterValue, matches, parse_filter
from backend.errors import ApiError
from backend.models.registry import (
    REGISTERED_MODELS,
    LocalModelSpec,
    UnknownModelError,
    canonical_model_name,
)

__all__ = [
    "SHAPE_VERSION",
    "DeploymentShapeVersion",
    "TrainingShapeCatalog",
    "TrainingShapeVersion",
    "model_facts",
    "shapes_router",
]

SHAPE_VERSION = "1"
WILDCARD = "-"
_SHAPE_REF = re.compile(
    r"^accounts/(?P<account>[^/]+)/trainingShapes/(?P<shape>[^/]+)(/versions/(?P<version>[^/]+))?$"
)
TrainerMode = Literal["POLICY_TRAINER", "LORA_TRAINER", "FORWARD_ONLY"]
# Shape id suffix per trainer mode: recipes pick LORA_TRAINER shapes for LoRA policies and
# FORWARD_ONLY ones for frozen references; the local trainer runs every mode on one machine.
_MODE_SUFFIXES: dict[str, TrainerMode] = {
    "": "POLICY_TRAINER",
    "-lora": "LORA_TRAINER",
    "-forward": "FORWARD_ONLY",
}
# Architecture per model build: the random-init models are small Qwen3s, SmolLM2 is a Llama.
_MODEL_TYPES = {"random_init": "qwen3", "smollm2_gguf": "llama"}
T = TypeVar("T")
V = TypeVar("V", "TrainingShapeVersion", "DeploymentShapeVersion")
# The only orderings accepted (every list has at most one version per shape).
_ORDERINGS = frozenset({"", "create_time", "create_time desc", "name", "name desc"})

_TRAINING_FIELDS: dict[str, FieldKind] = {
    "name": "str",
    "latest_validated": "bool",
    "validated": "bool",
    "public": "bool",
    "snapshot.base_model": "str",
    "snapshot.model_type": "str",
    "snapshot.parameter_count": "int",
    "snapshot.trainer_mode": "str",
    "snapshot.accelerator_type": "str",
    "snapshot.accelerator_count": "int",
    "snapshot.node_count": "int",
    "snapshot.max_supported_context_length": "int",
    "snapshot.deployment_shape_version": "str",
}
_DEPLOYMENT_FIELDS: dict[str, FieldKind] = {
    "name": "str",
    "latest_validated": "bool",
    "validated": "bool",
    "public": "bool",
    "snapshot.base_model": "str",
    "snapshot.model_type": "str",
    "snapshot.parameter_count": "int",
    "snapshot.engine": "str",
    "snapshot.accelerator_type": "str",
    "snapshot.accelerator_count": "int",
    "snapshot.max_context_length": "int",
}


def model_facts(model: LocalModelSpec) -> tuple[str, int]:
    """(model type, parameter count) of a registered model, as shapes and models report them."""
    number, _, unit = model.parameters.partition(" ")
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(unit.strip(), 1)
    return _MODEL_TYPES[model.build], round(float(number) * scale)


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
    trainer_mode: TrainerMode
    base_model: str
    model_type: str
    # An int64, which the platform's JSON writes as a string.
    parameter_count: str
    trainer_sharding_scheme: ShardingScheme
    deployment_shape_version: str


class TrainingShapeVersion(ResponseModel):
    name: str
    snapshot: ShapeSnapshot
    latest_validated: bool = True
    validated: bool = True
    public: bool = True


class TrainingShapeVersionList(ResponseModel):
    training_shape_versions: list[TrainingShapeVersion]
    next_page_token: str | None = None


class DeploymentShapeSnapshot(ResponseModel):
    """What a deployment created with this shape serves on."""

    base_model: str
    model_type: str
    parameter_count: str
    accelerator_type: str
    accelerator_count: int
    engine: str
    max_context_length: int


class DeploymentShapeVersion(ResponseModel):
    name: str
    snapshot: DeploymentShapeSnapshot
    latest_validated: bool = True
    validated: bool = True
    public: bool = True


class DeploymentShapeVersionList(ResponseModel):
    deployment_shape_versions: list[DeploymentShapeVersion]
    next_page_token: str | None = None


class TrainingShapeCatalog:
    """The shapes of one account: per model, a training shape per trainer mode
    (`<model>-cpu`, `-cpu-lora`, `-cpu-forward`) and one deployment shape (`<model>-local`)."""

    def __init__(self, account_id: str) -> None:
        self.account_id = account_id
        self._training: dict[str, tuple[LocalModelSpec, TrainerMode]] = {
            model.training_shape_id + suffix: (model, mode)
            for model in REGISTERED_MODELS.values()
            for suffix, mode in _MODE_SUFFIXES.items()
        }
        self._deployment = {f"{model.name}-local": model for model in REGISTERED_MODELS.values()}

    def version(self, shape_id: str, version: str) -> TrainingShapeVersion:
        model, mode = _lookup(self._training, shape_id, "training shape")
        _check_version(shape_id, version, "training shape")
        return self._describe(shape_id, model, mode)

    def versions(
        self, shape_id: str, filter_expr: str, order_by: str = ""
    ) -> TrainingShapeVersionList:
        """The shape's one version (every shape's with the wildcard `-`) that the filter keeps."""
        terms = _canonical_base_models(parse_filter(filter_expr, _TRAINING_FIELDS))
        _check_order(order_by)
        ids = sorted(self._training) if shape_id == WILDCARD else [shape_id]
        found = [self.version(one, SHAPE_VERSION) for one in ids]
        kept = [v for v in found if matches(terms, _training_record(v))]
        return TrainingShapeVersionList(training_shape_versions=_ordered(kept, order_by))

    def deployment_version(self, shape_id: str, version: str) -> DeploymentShapeVersion:
        model = _lookup(self._deployment, shape_id, "deployment shape")
        _check_version(shape_id, version, "deployment shape")
        model_type, parameter_count = model_facts(model)
        return DeploymentShapeVersion(
            name=f"accounts/{self.account_id}/deploymentShapes/{shape_id}/versions/{SHAPE_VERSION}",
            snapshot=DeploymentShapeSnapshot(
                base_model=model.hf_name,
                model_type=model_type,
                parameter_count=str(parameter_count),
                accelerator_type="CPU",
                accelerator_count=1,
                # Not FIREATTENTION: recipes pair that engine with models whose details say so.
                engine="LOCAL",
                max_context_length=model.context_length,
            ),
        )

    def deployment_versions(
        self, shape_id: str, filter_expr: str, order_by: str = ""
    ) -> DeploymentShapeVersionList:
        terms = _canonical_base_models(parse_filter(filter_expr, _DEPLOYMENT_FIELDS))
        _check_order(order_by)
        ids = sorted(self._deployment) if shape_id == WILDCARD else [shape_id]
        found = [self.deployment_version(one, SHAPE_VERSION) for one in ids]
        kept = [v for v in found if matches(terms, _deployment_record(v))]
        return DeploymentShapeVersionList(deployment_shape_versions=_ordered(kept, order_by))

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

    def _describe(
        self, shape_id: str, model: LocalModelSpec, mode: TrainerMode
    ) -> TrainingShapeVersion:
        account = self.account_id
        model_type, parameter_count = model_facts(model)
        return TrainingShapeVersion(
            name=f"accounts/{account}/trainingShapes/{shape_id}/versions/{SHAPE_VERSION}",
            snapshot=ShapeSnapshot(
                trainer_image_tag="local",
                deployment_image_tag="local",
                max_supported_context_length=model.context_length,
                node_count=1,
                # The local trainer runs wherever torch runs; naming the device would mean
                # importing torch in the control plane, so the shape says CPU.
                accelerator_type="CPU",
                accelerator_count=1,
                trainer_mode=mode,
                base_model=model.hf_name,
                model_type=model_type,
                parameter_count=str(parameter_count),
                trainer_sharding_scheme=ShardingScheme(pipeline_parallelism=1),
                deployment_shape_version=f"accounts/{account}/deploymentShapes/"
                f"{model.name}-local/versions/{SHAPE_VERSION}",
            ),
        )


def _lookup(table: dict[str, T], shape_id: str, what: str) -> T:
    found = table.get(shape_id)
    if found is None:
        known = ", ".join(sorted(table))
        reason = what.upper().replace(" ", "_") + "_NOT_FOUND"
        raise ApiError.not_found(
            f"{what} {shape_id!r} not found; the local platform has: {known}", reason=reason
        )
    return found


def _check_version(shape_id: str, version: str, what: str) -> None:
    if version != SHAPE_VERSION:
        raise ApiError.not_found(
            f"{what} {shape_id!r} has no version {version!r} (only {SHAPE_VERSION!r})",
            reason=what.upper().replace(" ", "_") + "_VERSION_NOT_FOUND",
        )


def _check_order(order_by: str) -> None:
    if order_by.strip() not in _ORDERINGS:
        accepted = ", ".join(repr(o) for o in sorted(_ORDERINGS) if o)
        raise ApiError.invalid_argument(f"orderBy {order_by!r} is not supported; use {accepted}")


def _ordered(versions: list[V], order_by: str) -> list[V]:
    # One version per shape, all created together: newest-first equals the name order.
    return sorted(versions, key=lambda v: v.name, reverse=order_by.strip() == "name desc")


def _canonical_base_models(terms: list[FilterTerm]) -> list[FilterTerm]:
    """Base-model terms compare registry names, so every spelling of a model matches it."""
    return [
        term.model_copy(update={"value": _canonical(str(term.value))})
        if term.field == "snapshot.base_model"
        else term
        for term in terms
    ]


def _canonical(base_model: str) -> str:
    try:
        return canonical_model_name(base_model)
    except UnknownModelError:
        return f"unknown:{base_model}"  # matches no local model, equals nothing registered


def _training_record(version: TrainingShapeVersion) -> dict[str, FilterValue]:
    snapshot = version.snapshot
    return {
        "name": version.name,
        "latest_validated": version.latest_validated,
        "validated": version.validated,
        "public": version.public,
        "snapshot.base_model": canonical_model_name(snapshot.base_model),
        "snapshot.model_type": snapshot.model_type,
        "snapshot.parameter_count": int(snapshot.parameter_count),
        "snapshot.trainer_mode": snapshot.trainer_mode,
        "snapshot.accelerator_type": snapshot.accelerator_type,
        "snapshot.accelerator_count": snapshot.accelerator_count,
        "snapshot.node_count": snapshot.node_count,
        "snapshot.max_supported_context_length": snapshot.max_supported_context_length,
        "snapshot.deployment_shape_version": snapshot.deployment_shape_version,
    }


def _deployment_record(version: DeploymentShapeVersion) -> dict[str, FilterValue]:
    snapshot = version.snapshot
    return {
        "name": version.name,
        "latest_validated": version.latest_validated,
        "validated": version.validated,
        "public": version.public,
        "snapshot.base_model": canonical_model_name(snapshot.base_model),
        "snapshot.model_type": snapshot.model_type,
        "snapshot.parameter_count": int(snapshot.parameter_count),
        "snapshot.engine": snapshot.engine,
        "snapshot.accelerator_type": snapshot.accelerator_type,
        "snapshot.accelerator_count": snapshot.accelerator_count,
        "snapshot.max_context_length": snapshot.max_context_length,
    }


def _listing_guard(check_account: AccountCheck) -> Callable[[str], None]:
    """Listings also accept the wildcard account `-` (every account the key can read)."""

    def check_listing_account(account: str) -> None:
        if account != WILDCARD:
            check_account(account)

    return check_listing_account


@dataclass(frozen=True)
class ListingQuery:
    """A listing's query: its filter and order (pages: one, whatever the size asked)."""

    filter_expr: str
    order_by: str


def _listing_query(
    filter_expr: Annotated[str, Query(alias="filter")] = "",
    order_by: Annotated[str, Query(alias="orderBy")] = "",
    page_size: Annotated[int, Query(alias="pageSize", ge=0)] = 0,
    page_token: Annotated[str, Query(alias="pageToken")] = "",
) -> ListingQuery:
    _check_page_token(page_token)
    return ListingQuery(filter_expr, order_by)


def shapes_router(catalog: TrainingShapeCatalog, check_account: AccountCheck) -> APIRouter:
    """Version routes under `/v1/accounts/{account}/trainingShapes` and `…/deploymentShapes`;
    the listings take `-` for the account and the shape."""
    router = APIRouter(prefix="/v1/accounts/{account}")
    listing = [Depends(_listing_guard(check_account))]
    single = [Depends(check_account)]

    @router.get(
        "/trainingShapes/{shape_id}/versions",
        response_model_exclude_none=True,
        dependencies=listing,
    )
    def list_shape_versions(
        shape_id: str, query: Annotated[ListingQuery, Depends(_listing_query)]
    ) -> TrainingShapeVersionList:
        return catalog.versions(shape_id, query.filter_expr, query.order_by)

    @router.get(
        "/trainingShapes/{shape_id}/versions/{version}",
        response_model_exclude_none=True,
        dependencies=single,
    )
    def get_shape_version(shape_id: str, version: str) -> TrainingShapeVersion:
        return catalog.version(shape_id, version)

    @router.get(
        "/deploymentShapes/{shape_id}/versions",
        response_model_exclude_none=True,
        dependencies=listing,
    )
    def list_deployment_shape_versions(
        shape_id: str, query: Annotated[ListingQuery, Depends(_listing_query)]
    ) -> DeploymentShapeVersionList:
        return catalog.deployment_versions(shape_id, query.filter_expr, query.order_by)

    @router.get(
        "/deploymentShapes/{shape_id}/versions/{version}",
        response_model_exclude_none=True,
        dependencies=single,
    )
    def get_deployment_shape_version(shape_id: str, version: str) -> DeploymentShapeVersion:
        return catalog.deployment_version(shape_id, version)

    return router


def _check_page_token(page_token: str) -> None:
    # Every list fits one page, so no token is ever handed out.
    if page_token:
        raise ApiError.invalid_argument(
            f"pageToken {page_token!r} is unknown: these lists have a single page"
        )
