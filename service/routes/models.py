"""The loaded models, as their cards describe them."""

from __future__ import annotations

from fastapi import APIRouter

from service.auth import UNAUTHORIZED, ApiKey
from service.schemas import ModelInfo, ModelsResponse
from service.state import State

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[ApiKey], responses=UNAUTHORIZED)


@router.get("/models", response_model=ModelsResponse, summary="Names, versions, sha256, thresholds, input sizes")
async def models(state: State) -> ModelsResponse:
    qc = state.qc
    infos = [ModelInfo(name=c.name, architecture=c.architecture, version=c.created or c.sha256[:12], sha256=c.sha256,
                       thresholds=c.thresholds, input_size=c.input_size, classes=c.classes, metrics=c.metrics)
             for c in (qc.pres_card, qc.det_card, qc.sad_card, qc.cls_card, qc.colour_card) if c is not None]
    findings = qc.findings_card.thresholds if qc.findings_card is not None else {}
    return ModelsResponse(policy=qc.policy, device=str(qc.device), runtimes=qc.runtimes,
                          jpeg_decoder=qc.jpeg_decoder, models=infos,
                          findings_thresholds=findings)
