"""Manifests, patient-level splits, COCO boxes, statistics and the synthetic generator."""
