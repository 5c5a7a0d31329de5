"""Audit of mined sets against ground truth: precision metrics (metrics), the audit and sweep reports (report), pictures of anchors and their positives (show)."""
