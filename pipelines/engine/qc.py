"""The batched two-stage engine: bytes/paths/arrays in, one `QCResult` per input out, in order.

decode (thread pool, DCT-scaled) -> detector on the batch, whose FPN features also feed
stage 0 (the presence head: a cervix in the photo at all? no -> no_cervix) -> best cervix box
(the whole frame where the presence model vouches for a cervix the detector did not place
confidently: a close-up) -> area-averaged 32 px and 37 px crops -> Deep SAD and ResNeSt on the
crop batches (and, where the weights folder carries one, the crop-colour scorer on the 32 px
crops) -> decision policy. Each model runs on torch or, exported, on OpenVINO
(`runtime`; the steps around the models are the same code either way). Weights folders
without a presence model keep the older rule (the detector's threshold decides no_cervix). A
bad input becomes an `unreadable` row with its reason; the batch goes on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.transforms.v2 import functional as TF

from models.exportable import exportable
from models.io import verified_card
from pipelines.engine import openvino_runtime
from pipelines.engine.config import QCConfig, resolve_decoder, resolve_device, resolve_runtime
from pipelines.engine.crops import crop_boxes, expand_boxes, resized_crops, whole_frames
from pipelines.engine.decode import Decoded, DecodeError, as_result, check_size, decode, read_file
from pipelines.engine.decode_device import decode_on_device
from pipelines.engine.detector import detect, load_detector, shape_chunks
from pipelines.engine.findings import CROP as FINDINGS_CROP
from pipelines.engine.findings import finding_scores, judge, load_findings_card
from pipelines.engine.hashes import embed, encode_embedding, phash, whole_photo_hashes
from pipelines.engine.loading import loading
from pipelines.engine.memory import limit_malloc_arenas
from pipelines.engine.presence import colour_histograms, load_presence, pool_features
from pipelines.engine.qc_result import COLOUR_CARD, COLOUR_POLICIES, Label, Policy, QCResult, policies_for
from pipelines.engine.stage2 import colour_scores, interpret, load_colour, load_stage2, threshold_of
from pipelines.engine.weights_folder import best_policy, decision_of, in_role, present

Input = Union[bytes, str, Path, np.ndarray]
KINDS = ("regular", "green", "iodine")
log = logging.getLogger(__name__)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-GPU copies go through pinned memory so they are asynchronous (non_blocking) and
    queue behind the work already on the stream instead of stalling the host; anything else
    is a plain `.to`. (Not measured: no GPU was lent to the session that wrote it.)"""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class PixelKeys:
    """What the engine reads from each photo's pixels while the detector's floats exist, keyed
    by position in the detector's input list: the whole photo's pHash, the findings' 128 px
    crop (0..1, on the CPU) and stage 2's crops ({size: [3, size, size]}, 0..255), with the
    time each took."""

    phash: dict[int, str | None] = field(default_factory=dict)
    finding_crops: dict[int, torch.Tensor] = field(default_factory=dict)
    stage2_crops: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    hash_ms: float = 0.0
    crop_ms: float = 0.0
    stage2_crop_ms: float = 0.0


FloatsHook = Callable[[list[int], list[torch.Tensor]], None]
DetectionsHook = Callable[[list[int], list[torch.Tensor], ImageList, list[dict[str, torch.Tensor]]], None]


def _check_batch(items: Sequence[Input], names: Sequence[str] | None) -> None:
    """A batch as `run` takes it, refused before any decode: names of another length were
    zipped short (3 photos, 1 name: 1 result, logged as a model failure), and one path given
    alone was labelled one character at a time (an audit)."""
    if isinstance(items, (str, bytes, os.PathLike)) or (isinstance(items, np.ndarray) and items.ndim == 3):
        raise TypeError(f"items: a sequence of inputs, got one {type(items).__name__}; pass [item]")
    if names is not None and len(names) != len(items):
        raise ValueError(f"names: {len(names)} for {len(items)} items (one per item, in order)")


def _checked_batches(batches: Iterable[tuple[Sequence[Input], Sequence[str] | None]]
                     ) -> Iterator[tuple[Sequence[Input], Sequence[str] | None]]:
    for items, names in batches:
        _check_batch(items, names)
        yield items, names


class QCPipeline:
    def __init__(self, weights_dir: str | Path, config: QCConfig | None = None) -> None:
        self.cfg = config or QCConfig()
        if self.cfg.malloc_arenas is not None:
            limit_malloc_arenas(self.cfg.malloc_arenas)
        weights = Path(weights_dir)
        dev = resolve_device(self.cfg.device)
        self.device = torch.device(dev)
        self.runtime = resolve_runtime(self.cfg.runtime, self.device, weights)
        # The detector's torch module always loads: its transform, anchors and box decoding run
        # around the exported convolutions too. The stage-2 models are built in torch only when
        # torch runs them (None otherwise: their cards are all the engine reads).
        with loading(weights / "detector.json"):
            self.detector, self.det_card = load_detector(weights / "detector.json", dev)
            self.det_threshold = self.det_card.thresholds["score"]  # a misspelt key ran at 0.5, unsaid
        torch_stage2 = self.runtime == "torch"
        with loading(weights / "deep_sad.json"):
            self.deep_sad, self.sad_card = (load_stage2(weights / "deep_sad.json", dev) if torch_stage2
                                            else (None, verified_card(weights / "deep_sad.json")))
            in_role(self.sad_card, weights / "deep_sad.json")
            threshold_of(self.sad_card)  # checked here, where a missing one is named with its card
        with loading(weights / "classifier.json"):
            self.classifier, self.cls_card = (load_stage2(weights / "classifier.json", dev) if torch_stage2
                                              else (None, verified_card(weights / "classifier.json")))
            in_role(self.cls_card, weights / "classifier.json")
            threshold_of(self.cls_card)
            self.cls_size = self.cls_card.input_size[0]
        # optional stage 0: without it the detector's threshold alone decides no_cervix
        with loading(weights / "presence.json"):
            self.presence, self.pres_card = (load_presence(weights / "presence.json", self.det_card)
                                             if present(weights / "presence.json") else (None, None))
            self.presence_threshold = self.pres_card.thresholds["score"] if self.pres_card else 0.0
        # optional third stage-2 scorer (the crop's colour), for the two_of_three policy
        self.policies: tuple[Policy, ...] = policies_for(weights)
        with loading(weights / COLOUR_CARD):
            self.colour, self.colour_card = (load_colour(weights / COLOUR_CARD) if present(weights / COLOUR_CARD)
                                             else (None, None))
            if self.colour is not None:  # a misspelt threshold failed every photo (an audit)
                threshold_of(self.colour_card)
        # optional quality findings (blur, dark, overexposed, glare): thresholds from their card
        with loading(weights / "findings.json"):
            self.findings_card = (load_findings_card(weights / "findings.json")
                                  if self.cfg.findings and present(weights / "findings.json") else None)
        calibrated_on = ((self.findings_card.metrics.get("data") or {}).get("weights_detector_sha256")
                         if self.findings_card is not None else None)
        if calibrated_on not in (None, self.det_card.sha256):  # still usable, so said rather than refused
            log.warning("findings.json was calibrated on another detector's crops (%s..., this one %s...): its "
                        "thresholds may not hold; run `cervixqc calibrate-findings` with these weights",
                        calibrated_on[:12], self.det_card.sha256[:12])
        self.policy: Policy = self.cfg.policy or best_policy(self.sad_card, self.cls_card, self.colour_card)
        self.check_policy(self.policy)
        self._big = round(self.cls_size * 8 / 7)  # the classifier's crop before its centre crop, as trained
        self.pool = ThreadPoolExecutor(self.cfg.decode_threads)
        self.jpeg_decoder = resolve_decoder(self.cfg.jpeg_decoder, self.device)
        self.closed = False
        self.detector_batch = self.cfg.detector_batch or (64 if self.device.type == "cuda" else 4)
        # On CUDA the detector stays NCHW and, unless bf16 is asked for, float32: its input comes
        # in a few shapes a collection, and cuDNN builds NHWC plans per new shape. On an H200
        # (tests/benchmarks/cuda_detect.py, 128 clinic photos in 5 shapes, bundled detector) the
        # detector stage's first pass took 20.1 s NHWC against 1.4 s NCHW, and warm passes
        # 0.135 s (NHWC f32), 0.158 (NHWC bf16), 0.235 (NCHW bf16), 0.114 (NCHW f32): the first
        # whole bench's batched detector stage read 37 s for 512 photos, 3x the naive loop's.
        cuda = self.device.type == "cuda"
        if self.cfg.channels_last and self.runtime == "torch":
            for model in (self.deep_sad, self.classifier) + (() if cuda else (self.detector,)):
                model.to(memory_format=torch.channels_last)
        self._stage2_bf16 = self.cfg.bf16 if self.cfg.bf16 is not None else cuda
        self._detector_bf16 = self.cfg.bf16 is True  # None: float32 on CUDA too, and off on CPUs anyway
        # what runs each model: torch (the exporter views; a detector other than RetinaNet runs
        # its own forward), or the compiled OpenVINO model with the same outputs. Either way a
        # RetinaNet's boxes are decoded step by step, so only each photo's best box is decoded
        # (`best_detections`).
        torch_detector = exportable(self.detector) if isinstance(self.detector, RetinaNet) else None
        self._runs = ({"detector": torch_detector, "deep_sad": exportable(self.deep_sad),
                       "classifier": exportable(self.classifier)}
                      if torch_stage2 else dict.fromkeys(("detector", "deep_sad", "classifier")))
        self.runtimes = dict.fromkeys(self._runs, "torch")
        if self.runtime == "openvino":
            self._compile(weights)

    def _compile(self, weights: Path) -> None:
        """Every model through OpenVINO: the folder's export, or a conversion made (and cached)
        in a child process; then the detector's torch convolutions are dropped. A quantized
        (INT8) export runs only at precision "auto": asking for f32 or bf16 asks for the float
        model, converted from the safetensors as a missing export is (so `--precision f32`
        still labels as torch does); so does a float export stored float16 at f32."""
        cards = {"detector": self.det_card, "deep_sad": self.sad_card, "classifier": self.cls_card}
        # every export checked, the ones passed over too: at f32 a damaged or stale export ran
        # (converted from the safetensors) on a folder that auto and `serve` refused (an audit)
        exports = {name: openvino_runtime.verified_export(weights, name, card) for name, card in cards.items()}
        # f32 asks for torch's numbers: an export whose weights were rounded to float16 (the
        # export default) is passed over for a float32 conversion, unless the safetensors hold
        # float16 too (the bundled float16 export moved Deep SAD's distance by 1e-3, the float32
        # conversion by 1e-6)
        rounded = {name: e is not None and e.weights_compression == "float16"
                   and cards[name].storage_dtype != "float16" for name, e in exports.items()}
        use_export = {name: e is not None and (self.cfg.precision == "auto" or not e.quantization)
                      and not (self.cfg.precision == "f32" and rounded[name]) for name, e in exports.items()}
        # the exports first: a stale or altered one is refused before any conversion is paid for
        models = {n: (openvino_runtime.read_exported(weights, exports[n]), "exported")
                  for n in cards if use_export[n]}
        models |= openvino_runtime.converted(weights, {n: c for n, c in cards.items() if not use_export[n]},
                                             self.cfg.openvino_cache, self.cfg.precision)
        for name, (ov_model, source) in models.items():
            quantized = use_export[name] and bool(exports[name].quantization)
            self._runs[name] = openvino_runtime.Compiled(ov_model, self.cfg.precision, threads=torch.get_num_threads())
            self.runtimes[name] = f"openvino {'int8+' if quantized else ''}{self._runs[name].precision} ({source})"
        # to the meta device: shapes kept, 42 MB of storage freed
        self.detector.backbone.to("meta")
        self.detector.head.to("meta")

    def detector_inputs(self, items: Sequence[Input], batch_size: int = 16) -> list[np.ndarray]:
        """The detector's input tensors for `items`, exactly as the engine feeds them (decode,
        transform, chunks of `detector_batch`): INT8 calibration data for `quantize`."""
        seen: list[np.ndarray] = []
        run = self._runs["detector"]
        conv = run if run is not None else exportable(self.detector)  # torch: the export's own view

        def record(x: torch.Tensor) -> list[torch.Tensor]:
            seen.append(np.ascontiguousarray(x.detach().float().cpu().numpy()))
            with torch.no_grad():
                return list(conv(x))

        self._runs["detector"] = record
        try:
            for start in range(0, len(items), batch_size):
                self.run(list(items[start:start + batch_size]))
        finally:
            self._runs["detector"] = run
        return seen

    def _autocast(self, bf16: bool) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def _stamp(self, t: float) -> float:
        """Milliseconds since `t`, after the device has finished the work queued so far: CUDA
        kernels run asynchronously, and without the sync one stage's time lands in the next
        stage's. One sync per stage and batch; the results go to the host right after anyway."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - t) * 1000

    # -- stages -------------------------------------------------------------------------
    def _decode_one(self, item: Input, long_side: int) -> Decoded:
        if isinstance(item, np.ndarray):
            if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
                raise DecodeError(f"array must be HxWx3 uint8, got {item.shape} {item.dtype}")
            check_size(item.shape[1], item.shape[0], self.cfg.limits)
            # a copy: with decode ahead, a caller's buffer refilled for the next batch (a frame
            # reader's) changed this batch's pixels after their sha256 was taken (an audit). The
            # hash is of the copy: one copy, not two, and of the very pixels judged
            frame = np.array(item, order="C", copy=True)
            import hashlib

            return Decoded(torch.from_numpy(frame).permute(2, 0, 1), item.shape[1], item.shape[0],
                           hashlib.sha256(frame).hexdigest())
        return decode(self._encoded(item), self.cfg.limits, long_side)

    def _encoded(self, item: Input) -> bytes | bytearray | memoryview:
        """A file's or upload's encoded bytes. Anything else is a DecodeError, a row of its own:
        123 failed its whole batch, on the device decoder a bytearray too (audits)."""
        if not isinstance(item, (str, Path, bytes, bytearray, memoryview)):
            raise DecodeError(f"not an input the engine reads ({type(item).__name__}): bytes, a path or an "
                              "HxWx3 uint8 array")
        return read_file(item, self.cfg.limits) if isinstance(item, (str, Path)) else item

    def _decode(self, items: Sequence[Input]) -> list[Decoded | DecodeError]:
        # The crop needs more pixels than the detector: decode at twice the detector size.
        long_side = 2 * self.det_card.config["max_size"]

        pil_decode = as_result(lambda item: self._decode_one(item, long_side))
        if self.jpeg_decoder == "pil":
            return list(self.pool.map(pil_decode, items))
        # arrays need no decoding; files and bytes go to the device decoder
        out: list[Decoded | DecodeError | None] = [pil_decode(x) if isinstance(x, np.ndarray) else None for x in items]
        files = [i for i, r in enumerate(out) if r is None]
        read = as_result(lambda item: bytes(self._encoded(item)))
        datas = list(self.pool.map(lambda i: read(items[i]), files))
        for i, d in zip(files, decode_on_device(datas, self.device, self.pool, self.cfg.limits, long_side)):
            out[i] = d
        return out  # type: ignore[return-value]

    def _detect(self, images: list[torch.Tensor], on_floats: FloatsHook | None = None,
                on_detections: DetectionsHook | None = None) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor | None]:
        """The detector over the uint8 images in chunks of `detector_batch`, in input order, with
        the pooled FPN features stage 0 reads (None without a presence head).

        The hooks see each chunk's images as floats (0..1) before they are freed,
        `on_floats(positions, floats)` right after the conversion and
        `on_detections(positions, floats, detector_input, detections)` after the detector:
        what else reads the pixels (the whole-photo hash, the findings' crop) reads them
        there rather than converting the uint8 photo again (0.71 ms a photo on 300 real-mix
        photos, 2-core CPU).

        Only a chunk's images are ever float at once: 16 phone photos decoded at ~1000 px are
        146 MB as floats, and keeping the whole batch's floats made the engine's peak RSS 130 MB
        higher on the 300 real-mix photos (hashes and findings convert only the pixels they read).

        torchvision pads every image of a forward to the largest one, so a chunk holds only
        images of one detector-input shape (`shape_chunks`): a photo's box and scores do not
        depend on what else is in its batch (a service batch mixes clients' uploads). Padded
        with its neighbours, a portrait photo among landscape ones got another box from the
        same weights. A collection's photos come in a few shapes, so the chunks stay full
        (the bench's 300 real-mix photos: 2 shapes)."""
        chunks = shape_chunks(self.detector.transform, [im.shape[-2:] for im in images], self.detector_batch)
        dets: list[dict[str, torch.Tensor] | None] = [None] * len(images)
        feats: list[torch.Tensor | None] = [None] * len(images)
        with self._autocast(self._detector_bf16):
            for chunk in chunks:
                batch = [TF.to_dtype(images[k], torch.float32, scale=True) for k in chunk]
                if on_floats is not None:
                    with torch.autocast(self.device.type, enabled=False):  # hash bits must not depend on bf16
                        on_floats(chunk, batch)
                run = self._runs["detector"]
                out, maps, padded = detect(self.detector, batch, self.device, run, best_only=run is not None)
                pooled = [None] * len(chunk) if self.presence is None else pool_features(maps, padded)
                for k, d, f in zip(chunk, out, pooled):
                    dets[k], feats[k] = d, f
                if on_detections is not None:
                    with torch.autocast(self.device.type, enabled=False):
                        on_detections(chunk, batch, padded, out)
        return dets, (torch.stack(feats) if self.presence is not None and feats else None)  # type: ignore[arg-type]

    def _confident_box(self, det: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The detector's best box when it clears the detector's threshold."""
        if len(det["scores"]) == 0 or float(det["scores"].max()) < self.det_threshold:
            return None
        return det["boxes"][int(det["scores"].argmax())]

    def _hash_photos(self, keys: PixelKeys, positions: list[int], floats: list[torch.Tensor]) -> None:
        t = time.perf_counter()
        keys.phash.update(zip(positions, whole_photo_hashes(floats)))
        keys.hash_ms += self._stamp(t)

    def _crops_beside_detector(self, keys: PixelKeys, positions: list[int], floats: list[torch.Tensor],
                               detector_input: ImageList, dets: list[dict[str, torch.Tensor]]) -> None:
        """Both crops of the box stage 2 and the findings judge: the detector's confident box,
        else the whole frame (a close-up stage 0 vouches for, or no cervix), in each photo's
        pixels."""
        boxes = [whole_frames([im])[0] if (box := self._confident_box(det)) is None else box.float().cpu()
                 for im, det in zip(floats, dets)]
        self._crop_for_stage2(keys, positions, floats, boxes)
        if self.findings_card is not None:
            self._crop_for_findings(keys, positions, floats, detector_input, boxes)

    def _crop_for_stage2(self, keys: PixelKeys, positions: list[int], floats: list[torch.Tensor],
                         boxes: list[torch.Tensor]) -> None:
        """Stage 2's crops, taken from the detector's floats: from the uint8 photo after the
        detector, converting the box's pixels to float again was a quarter of the crop stage
        (torch's profiler on the 300 real-mix photos' crops). A photo stage 0 turns to
        no_cervix wastes its crops (area averages: cheap)."""
        t = time.perf_counter()
        crops = crop_boxes(floats, torch.stack(boxes), sizes=(32, self._big), margin=self.cfg.crop_margin)
        crops = {size: batch.mul_(255) for size, batch in crops.items()}  # the 0..255 the models were trained on
        for k, position in enumerate(positions):
            keys.stage2_crops[position] = {size: batch[k] for size, batch in crops.items()}
        keys.stage2_crop_ms += self._stamp(t)

    def _crop_for_findings(self, keys: PixelKeys, positions: list[int], floats: list[torch.Tensor],
                           detector_input: ImageList, boxes: list[torch.Tensor]) -> None:
        """The findings' crop, taken from the detector's own input (long side `max_size`,
        normalized; undone on the crop). From the decoded photo (640-1280 px) the 128 px crop
        read every pixel of the box again: about 1 ms of the findings' 1.4 ms a photo on the
        300 real-mix photos (2-core CPU). The findings' thresholds are calibrated on this crop
        (`cervixqc calibrate-findings` runs the engine).

        A box under the crop's size in that input (the region `resized_crops` reads: widened by
        the margin, clipped to the frame) is cropped from the decoded photo instead: upsampled
        from the input, the crop had lost the finest detail, which the blur score reads, and a
        sharp small cervix read as blurred. None of the 110 real validation photos with a box
        has such a box (the smallest is about 250 px at 320; a few degraded calibration copies
        do), but 57% of the generator's `teaching` scenes with a box do (median 122 px): their
        blur AUC rose from 0.913 to 0.937 on a second synthetic set (seed 7), the real
        calibration's figures the same within 0.003; the findings' time per photo unchanged
        within the noise (alternating rounds, 2026-12-03).

        A photo smaller than the detector's input is cropped from the photo too (the input is
        its enlargement), and a region under the crop's size in the photo itself gets a crop
        of its own size (multiples of 8, 64 px at least) instead of an enlarged one: enlarged,
        it had lost the finest detail the blur score reads. The 421 train + val cervix photos
        downscaled to a quarter (96-200 px), scored against blurred copies downscaled alike:
        sharp photos flagged blur 38% -> 0.2%, blur AUC 0.929 -> 0.933, recall at the card's
        threshold 0.926 -> 0.667 (at full size: 0.5% and 0.789); at half size 1.9% -> 1.2%,
        AUC 0.961 -> 0.968. Crops of 64 px everywhere under 128 read AUC 0.920 at a quarter.
        `calibrate-findings` on the real split: every original and ordinary copy scored as
        before to the digit, 15 of 3,204 rows moved (glare and dark copies whose box shrank),
        and no threshold or card figure did, so `SCORES_VERSION` stays (2026-12-05).

        A photo stage 0 turns to no_cervix despite a confident box keeps this crop of that box:
        it was cropped again whole, and a photo washed out or darkened past stage 0 was then
        judged with its dark speculum or surround. On the synthetic `teaching` scenes (seed 7,
        chosen there; seed 99 judged after) overexposed AUC rose 0.942 -> 0.961 and 0.948 ->
        0.963, blur 0.937 -> 0.941 and 0.958 -> 0.959, dark 0.994 -> 0.996 and 0.990 both, glare
        0.999 -> 0.998 and 0.998 -> 0.996; on the real calibration split 54 of 3,204 rows moved
        and no threshold or test figure did (2026-12-04, `cervixqc calibrate-findings`)."""
        t = time.perf_counter()
        mean = torch.tensor(self.detector.transform.image_mean, device=detector_input.tensors.device)[:, None, None]
        std = torch.tensor(self.detector.transform.image_std, device=detector_input.tensors.device)[:, None, None]
        margin = self.cfg.crop_margin
        inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # k: (the detector's input, the box in it)
        # crop side -> {k: (the decoded photo, the box)}: FINDINGS_CROP, or the region's own side under it
        photos: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for k, (im, box) in enumerate(zip(floats, boxes)):
            h, w = detector_input.image_sizes[k]
            scaled = box * torch.tensor([w / im.shape[-1], h / im.shape[-2]] * 2)
            region = expand_boxes(scaled[None], margin, w, h)[0]
            if float((region[2:] - region[:2]).max()) >= FINDINGS_CROP and h <= im.shape[-2]:
                inputs[k] = (detector_input.tensors[k, :, :h, :w], scaled)
                continue
            own = expand_boxes(box[None], margin, im.shape[-1], im.shape[-2])[0]
            side = min(FINDINGS_CROP, max(FINDINGS_CROP // 2, int((own[2:] - own[:2]).max()) // 8 * 8))
            photos.setdefault(side, {})[k] = (im, box.to(im.device))
        groups = [(inputs, lambda c: c * std + mean, FINDINGS_CROP)] + [(g, lambda c: c, s) for s, g in photos.items()]
        for taken, undo, side in groups:
            if taken:
                images, taken_boxes = zip(*taken.values())
                crops = undo(resized_crops(images, torch.stack(taken_boxes), side, margin)).clamp_(0, 1).cpu()
                keys.finding_crops.update(zip((positions[k] for k in taken), crops))
        keys.crop_ms += self._stamp(t)

    def _presence(self, image_of: dict, feats: torch.Tensor | None, timings: dict) -> dict[int, float | None]:
        """Stage-0 score per decoded image, or None for every image when the weights folder has
        no presence head (older folders: the detector's threshold then decides no_cervix)."""
        if self.presence is None:
            return dict.fromkeys(image_of)
        t = time.perf_counter()
        cfg = self.presence.cfg
        hist = colour_histograms(list(image_of.values()), cfg.hist_bins, cfg.hist_side)
        scores = self.presence(hist, feats)
        timings["presence"] = self._stamp(t)
        return dict(zip(image_of, scores.tolist()))

    @property
    def decision(self) -> dict:
        return decision_of(self.policy, (self.det_card, self.sad_card, self.cls_card, self.pres_card,
                                         self.colour_card), self.findings_card)

    def check_policy(self, policy: Policy) -> None:
        """ValueError, saying why, for a policy these weights cannot run."""
        if policy not in self.policies:
            raise ValueError(f"policy {policy!r} needs a crop-colour model (colour.json) in the weights folder"
                             if policy in COLOUR_POLICIES else f"unknown policy {policy!r}")

    def label_for(self, sad: float, prob: float, policy: Policy | None = None, colour: float | None = None) -> Label:
        """The decision for one crop's scores under a policy (default: the configured one);
        `colour` is the crop-colour score, which only `two_of_three` reads."""
        policy = policy or self.policy
        sad_says = sad >= threshold_of(self.sad_card)
        res_says = prob >= threshold_of(self.cls_card)
        if policy in COLOUR_POLICIES:
            self.check_policy(policy)
            if colour is None:
                raise ValueError(f"policy {policy!r} needs the crop's colour score")
            flagged = sad_says + res_says + (colour >= threshold_of(self.colour_card)) >= 2
        else:
            flagged = {"deep_sad": sad_says, "resnest": res_says, "either": sad_says or res_says,
                       "both": sad_says and res_says}[policy]
        return Label.NON_REGULAR if flagged else Label.REGULAR

    def run(self, items: Sequence[Input], names: Sequence[str] | None = None,
            policy: Policy | None = None) -> list[QCResult]:
        _check_batch(items, names)
        self._check_open()
        return self._run_decoded(items, names, *self._timed_decode(items), policy)

    def run_stream(self, batches: Iterable[tuple[Sequence[Input], Sequence[str] | None]],
                   policy: Policy | None = None) -> Iterator[list[QCResult]]:
        """`run` over a stream of (items, names) batches, decoding batch n+1 in the background
        while batch n is on the models. One batch ahead at most, so memory holds two batches
        of decoded images, whatever the stream's length. Without `decode_ahead` it is plain
        `run` per batch. A stream that fails while batch n+1 is being read (a refused batch, a
        caller's reader raising) still yields batch n first, then raises: the rows already
        decoded are not lost to the next batch's fault."""
        self._check_open()
        ahead_on = self.cfg.decode_ahead if self.cfg.decode_ahead is not None else self.device.type == "cuda"
        if not ahead_on:
            for items, names in batches:
                yield self.run(items, names, policy)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="decode-ahead") as ahead:
            stream = _checked_batches(batches)
            current = next(stream, None)
            pending = ahead.submit(self._timed_decode, current[0]) if current is not None else None
            while current is not None and pending is not None:
                decoded, ms = pending.result()
                stream_error = None
                try:
                    following = next(stream, None)
                except Exception as e:  # noqa: BLE001 - raised after this batch's rows are out
                    following, stream_error = None, e
                pending = ahead.submit(self._timed_decode, following[0]) if following is not None else None
                yield self._run_decoded(current[0], current[1], decoded, ms, policy)
                if stream_error is not None:
                    raise stream_error
                current = following

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this QCPipeline was closed; make a new one")

    def _timed_decode(self, items: Sequence[Input]) -> tuple[list[Decoded | DecodeError], float]:
        t0 = time.perf_counter()
        decoded = self._decode(items)
        return decoded, self._stamp(t0)

    @torch.inference_mode()
    def _run_decoded(self, items: Sequence[Input], names: Sequence[str] | None, decoded: list[Decoded | DecodeError],
                     t_decode: float, policy: Policy | None = None) -> list[QCResult]:
        """`_judge`, and where a batch fails in the models, its photos judged one by one: a
        photo the checks in `decode` let through but the models cannot take costs its own row
        (`unreadable`, with the error), not its batch's, which in the service holds other
        clients' uploads. Where every photo fails alone too, the fault is not the photos'
        and the batch's error is raised (a job fails and resumes later rather than storing
        its rows as unreadable)."""
        names = list(names) if names is not None else [str(i) if isinstance(i, (str, Path)) else f"item{k}"
                                                       for k, i in enumerate(items)]
        if policy is not None:
            self.check_policy(policy)  # before any work, not at the first crop
        try:
            return self._judge(names, decoded, t_decode, policy)
        except Exception as batch_error:
            readable = [i for i, d in enumerate(decoded) if isinstance(d, Decoded)]
            if len(readable) < 2:
                raise
            log.warning("a batch of %d failed in the models (%s: %s); judging its photos one by one",
                        len(decoded), type(batch_error).__name__, batch_error)
            results = []
            for name, d in zip(names, decoded):
                try:
                    results.append(self._judge([name], [d], t_decode, policy)[0])
                except Exception as e:  # noqa: BLE001 - this photo's row says why
                    results.append(QCResult(path=name, label=Label.UNREADABLE,
                                            error=f"the models failed on this image ({type(e).__name__}: {e})"[:500]))
            if all(results[i].label == Label.UNREADABLE for i in readable):
                raise batch_error
            return results

    def _judge(self, names: list[str], decoded: list[Decoded | DecodeError], t_decode: float,
               policy: Policy | None) -> list[QCResult]:
        t0 = time.perf_counter()
        results: list[QCResult | None] = [None] * len(decoded)
        ok = [i for i, d in enumerate(decoded) if isinstance(d, Decoded)]
        for i, d in enumerate(decoded):
            if isinstance(d, DecodeError):
                results[i] = QCResult(path=names[i], label=Label.UNREADABLE, error=d.reason)
        timings = {"decode": t_decode}
        if ok:
            image_of = {i: to_device(decoded[i].image, self.device) for i in ok}  # uint8: a quarter of float
            t1 = time.perf_counter()
            keys = PixelKeys()
            dets, feats = self._detect(
                [image_of[i] for i in ok],
                on_floats=(lambda *a: self._hash_photos(keys, *a)) if self.cfg.findings else None,
                on_detections=lambda *a: self._crops_beside_detector(keys, *a))
            timings["detect"] = self._stamp(t1) - keys.hash_ms - keys.crop_ms - keys.stage2_crop_ms
            timings["crop"] = keys.stage2_crop_ms
            timings["hash"] = keys.hash_ms
            present = self._presence(image_of, feats, timings)
            whole = {i: keys.phash.get(k) for k, i in enumerate(ok)}
            crop_of = {i: k for k, i in enumerate(ok)}  # position in the detector's list
            with_box, no_cervix = [], []
            for i, det in zip(ok, dets):
                d = decoded[i]
                top = float(det["scores"].max()) if len(det["scores"]) else 0.0
                base = dict(path=names[i], sha256=d.sha256, width=d.width, height=d.height, cervix_score=top,
                            presence_score=present[i], phash=whole[i])
                box = self._confident_box(det)
                vouched = present[i] is not None and present[i] >= self.presence_threshold
                if (present[i] is None and box is None) or (present[i] is not None and not vouched):
                    results[i] = QCResult(label=Label.NO_CERVIX, **base)
                    no_cervix.append(i)
                    continue
                if box is None:  # stage 0 vouches for a cervix the detector could not place: a close-up
                    h, w = image_of[i].shape[-2:]
                    box = torch.tensor([0.0, 0.0, float(w), float(h)])
                sx, sy = d.scale
                with_box.append((i, base, (box / torch.tensor([sx, sy, sx, sy])).tolist()))
            timings["findings"] = keys.crop_ms
            if with_box:
                t1 = time.perf_counter()
                found = self._findings([keys.finding_crops.get(crop_of[i]) for i, _, _ in with_box])
                timings["findings"] += self._stamp(t1)
                self._stage2([keys.stage2_crops[crop_of[i]] for i, _, _ in with_box], with_box, found, results,
                             timings, policy)
            if no_cervix and self.findings_card is not None:  # why was no cervix seen?
                t1 = time.perf_counter()
                # the crop taken beside the detector: its confident box where stage 0 vetoed one,
                # else the whole frame (`_crop_for_findings`)
                crops = [keys.finding_crops[crop_of[i]] for i in no_cervix]
                for i, found in zip(no_cervix, self._findings(crops)):
                    results[i].findings = found
                timings["findings"] += self._stamp(t1)
        total = t_decode + (time.perf_counter() - t0) * 1000
        for r in results:
            r.timings_ms = {**timings, "total": total}
        return results  # type: ignore[return-value]

    def _findings(self, crops: list[torch.Tensor | None]) -> list[dict]:
        """The quality findings of each photo's findings crop (0..1; {} each without a findings
        card)."""
        if self.findings_card is None:
            return [{} for _ in crops]
        found: list[dict] = [{} for _ in crops]
        by_side: dict[int, list[int]] = {}  # a small photo's crop is of its own size (`_crop_for_findings`)
        for i, crop in enumerate(crops):
            by_side.setdefault(crop.shape[-1], []).append(i)
        for idx in by_side.values():
            for i, f in zip(idx, judge(finding_scores(torch.stack([crops[i] for i in idx])), self.findings_card)):
                found[i] = f
        return found

    def _stage2(self, photo_crops: list[dict[int, torch.Tensor]], with_box, found, results, timings,
                policy: Policy | None) -> None:
        big = self._big
        crops = {size: torch.stack([c[size] for c in photo_crops]) for size in (32, big)}
        t = time.perf_counter()
        crop_hashes = phash(crops[32]) if self.cfg.findings else [None] * len(with_box)
        timings["hash"] += self._stamp(t)
        t = time.perf_counter()
        with self._autocast(self._stage2_bf16):
            sad = interpret(self.sad_card, self._runs["deep_sad"]((crops[32] / 255).to(self.device)))["score"]
            cls_in = TF.center_crop(crops[big] / 255, [self.cls_size, self.cls_size]).to(self.device)
            out = interpret(self.cls_card, self._runs["classifier"](cls_in))
        colour = colour_scores(self.colour, crops[32]).tolist() if self.colour is not None else [None] * len(with_box)
        timings["classify"] = self._stamp(t)
        embeddings = [encode_embedding(e) for e in embed(out["features"])] if self.cfg.findings else [None] * len(with_box)
        for k, (i, base, box) in enumerate(with_box):
            s, p = float(sad[k]), float(out["score"][k])
            label = self.label_for(s, p, policy, colour[k])
            kind = None
            if label == Label.NON_REGULAR or self.cfg.kind_of_every_crop:
                kind = KINDS[1 + int(out["kind_probs"][k, 1:].argmax())]
            results[i] = QCResult(label=label, kind=kind, cervix_box=[round(v, 1) for v in box],
                                  deep_sad_score=s, resnest_prob=p, colour_score=colour[k], findings=found[k],
                                  crop_hash=crop_hashes[k], embedding=embeddings[k], **base)

    def close(self) -> None:
        """Lets the decode threads go; a `run` after it is a RuntimeError saying so (it was
        the thread pool's "cannot schedule new futures after shutdown")."""
        self.closed = True
        self.pool.shutdown(wait=False)

    def __enter__(self) -> QCPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
