"""The QC engine in its own room: decode, detector, presence (stage 0), crops, stage 2, the
exported-model runtime, and `QCPipeline`, which runs them batched. Training and evaluation
import from here; nothing here imports them."""
