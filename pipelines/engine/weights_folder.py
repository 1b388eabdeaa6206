"""A weights folder as the engine reads it: each card checked under its own name and loaded
with its failures named, the decision (policy, sha256s, thresholds) its models label under,
and the default policy its cards record."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from models.io import ModelCard, WeightsIntegrityError, verified_card
from pipelines.engine import openvino_runtime
from pipelines.engine.findings import FindingsCard, load_findings_card
from pipelines.engine.loading import loading
from pipelines.engine.presence import other_detector
from pipelines.engine.qc_result import COLOUR_CARD, COLOUR_POLICIES, POLICIES, Policy
from pipelines.engine.stage2 import check_colour_config

log = logging.getLogger(__name__)


def best_policy(sad_card, cls_card, colour_card=None) -> Policy:
    """The default decision.

    First choice: the policy recorded on the stage-2 cards as the best whole-pipeline F1 on
    validation (`metrics.policy_choice`, written by `weights/finalize.py policy` from an
    `eval-pipeline` validation report; never a test figure). It is read only while it names
    the sha256 of both models loaded: it was measured on that pair, and a retrained model
    makes it stale. Detector crops, not ground-truth boxes, feed the models there, and the two
    combinations are candidates: with the bundled weights `both` (a Deep SAD flag needs the
    classifier's agreement) removed the one-class model's false flags on cool-toned regulars.

    Otherwise (older cards, or a stale choice): whichever stage-2 model has the higher F1 on
    its validation crops (the cards' metrics.val.f1). Ties and cards without validation
    metrics go to ResNeSt, the paper's final choice. A choice that needs the crop-colour
    scorer is read only while that very model is loaded too."""
    def choice_of(card) -> dict:  # a hand-edited card's null or text was an AttributeError traceback (an audit)
        choice = card.metrics.get("policy_choice")
        return choice if isinstance(choice, dict) else {}

    for card in (sad_card, cls_card):
        choice = choice_of(card)
        colour_ok = choice.get("policy") not in COLOUR_POLICIES or (
            colour_card is not None and choice.get("colour_sha256") == colour_card.sha256)
        if (choice.get("policy") in POLICIES and choice.get("deep_sad_sha256") == sad_card.sha256
                and choice.get("classifier_sha256") == cls_card.sha256 and colour_ok):
            return choice["policy"]

    def val_f1(card) -> float:
        val = card.metrics.get("val")
        f1 = val.get("f1") if isinstance(val, dict) else None  # null: undefined (no positive)
        return float(f1) if f1 is not None else float("-inf")

    fallback = "deep_sad" if val_f1(sad_card) > val_f1(cls_card) else "resnest"
    recorded = [choice_of(c)["policy"] for c in (sad_card, cls_card) if choice_of(c).get("policy")]
    if recorded:  # a model retrained since: the folder's default changed without a word
        log.warning("the policy recorded on the stage-2 cards (%s) was chosen for other models than these; "
                    "labelling with %s (better validation F1 on its own): choose again with weights/finalize.py "
                    "policy, or pass a policy", recorded[0], fallback)
    return fallback


def present(card: Path) -> bool:
    """Whether an optional card (presence, colour, findings) is there. A dangling link or a
    folder under its name read as no card: stage 0, the colour vote or the findings were
    switched off, unsaid (an audit)."""
    if card.is_file():
        return True
    if card.is_symlink() or card.exists():
        raise WeightsIntegrityError(f"{card}: not a file (a dangling link? a folder?): put the card there, or "
                                    "remove the name")
    return False


def in_role(card: ModelCard | None, path: Path) -> ModelCard | None:
    """A weights folder's card under its own file name. The classifier's card copied over
    deep_sad.json ran the classifier as Deep SAD at a site, unsaid, and Deep SAD's as
    classifier.json failed on the first photo with a traceback (an audit)."""
    if card is not None and card.name != path.stem:
        raise WeightsIntegrityError(f"{path}: holds the card of the {card.name!r} model, not of {path.stem!r}: "
                                    "a file copied into the wrong place? copy each model's card and weights "
                                    "under their own names")
    return card


def decision_of(policy: str, cards: Iterable[ModelCard | None], findings: FindingsCard | None = None) -> dict:
    """What decides a label: the policy, and the sha256 and thresholds of every model that
    votes. A results folder's rows hold only under the decision that made them (StateStore).
    Thresholds count since `cervixqc calibrate-stage2` moves them with the networks kept: under
    the sha256s alone, a rerun into the folder kept every old label. So do the findings' card
    (None: no findings flagged): after `calibrate-findings`, a rerun kept every row's old flags
    and quarantined by them (an audit)."""
    voting = [c for c in cards if c is not None]
    return {"policy": policy, "models": {c.name: c.sha256 for c in voting},
            "findings": None if findings is None else {"scores_version": findings.scores_version,
                                                       "thresholds": dict(sorted(findings.thresholds.items()))},
            "thresholds": {c.name: dict(sorted(c.thresholds.items())) for c in voting},
            # cards whose thresholds a site chose again: a record made before thresholds were
            # recorded cannot be taken as labelled under them (`StateStore._claim_decision`)
            "site_calibrated": sorted(c.name for c in voting if "site_calibration" in c.metrics)}


# the threshold each model's card must hold, as the engine reads it
THRESHOLD_KEYS = {"detector": "score", "deep_sad": "distance", "classifier": "probability", "presence": "score",
                  COLOUR_CARD.removesuffix(".json"): "probability"}


def folder_cards(weights: Path) -> dict[str, ModelCard]:
    """The verified cards of every model a weights folder holds: the three the engine needs,
    and presence and colour where present, each with the threshold the engine reads (a
    misspelt key passed `serve`'s check, then failed its start or every photo: an audit).
    Each failure a WeightsIntegrityError naming its card."""
    cards = {}
    for name, key in THRESHOLD_KEYS.items():
        card = weights / f"{name}.json"
        if name in ("detector", "deep_sad", "classifier") or present(card):
            with loading(card):
                cards[name] = in_role(verified_card(card), card)
                if key not in cards[name].thresholds:
                    raise ValueError(f"no {key!r} threshold (it has: {', '.join(cards[name].thresholds) or 'none'})")
                if name == "classifier" and not cards[name].input_size:
                    raise ValueError("no input_size")
                if name == COLOUR_CARD.removesuffix(".json"):
                    check_colour_config(cards[name].config)
    return cards


def decision_for(weights: Path, policy: str | None) -> dict:
    """`decision_of` from a weights folder's cards alone, as an engine built on it decides
    (a Ray run's driver, whose engines live in the actors)."""
    cards = folder_cards(weights)
    sad, cls, colour = cards["deep_sad"], cards["classifier"], cards.get(COLOUR_CARD.removesuffix(".json"))
    findings = None
    if present(weights / "findings.json"):  # as the engine reads it (`QCConfig.findings` on)
        with loading(weights / "findings.json"):
            findings = load_findings_card(weights / "findings.json")
    return decision_of(policy or best_policy(sad, cls, colour), cards.values(), findings)


def check_weights(weights: Path, exports: bool = True) -> None:
    """Every card of a weights folder the engine would read, checked as loading checks it but
    without building a model (cards, sha256s, an export made from other weights, the findings'
    thresholds): the service's check before it starts, since a failure inside its startup was a
    70-line traceback, repeated by every restart. WeightsIntegrityError naming the file."""
    cards = folder_cards(weights)
    if "presence" in cards:  # a detector retrained alone: `serve` passed this check, then failed to start
        mismatch = other_detector(weights / "presence.json", cards["presence"], cards["detector"])
        if mismatch:
            raise WeightsIntegrityError(mismatch)
    if present(weights / "findings.json"):
        with loading(weights / "findings.json"):
            load_findings_card(weights / "findings.json")
    if exports:
        for name in ("detector", "deep_sad", "classifier"):
            openvino_runtime.verified_export(weights, name, cards[name])
