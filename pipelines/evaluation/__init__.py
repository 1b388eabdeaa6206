"""Metrics and reports: COCO mAP for detectors; classification metrics and the HTML report later."""
