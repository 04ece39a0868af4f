"""The model registry: immutable versions, stages as pointer files, promotion and rollback (store.py);
what a card must hold to be promoted (checks.py); `dermaid registry ...` (cli.py); `dermaid gc` (gc.py).

    from dermaid.registry import Registry, resolve_model_url
"""

from dermaid.registry.checks import check_card
from dermaid.registry.store import (DEFAULT_STAGE, CardCheckError, ModelVersion, PromotionConflict, Registry,
                                    RegistryError, StagePointer, resolve_model_url)

__all__ = ["DEFAULT_STAGE", "CardCheckError", "ModelVersion", "PromotionConflict", "Registry", "RegistryError",
           "StagePointer", "check_card", "resolve_model_url"]
