"""What a saliency request may ask for: the Grad-CAM family's method names and the overlay's size limit.

Torch-free on purpose: the code that checks requests (serve.args, serve.schemas, serve.errors: the launcher and the
Ingress replica) needs these names but not the models, and importing torch costs seconds of a cold start.
saliency.py (the Explainer) reads them from here.
"""

# Longest side of an overlay unless full_size is asked for: a screen's width, whatever the upload's size. A 50 MP
# upload's full-size overlay added ~0.9 GB to the Explainer and a ~20 MB PNG; at 2048 px, 35-250 MB (mostly the
# decode: a JPEG drafts, a PNG cannot) and ~2-3 MB (benchmarks/image_cost.py, docs/benchmarks.md).
OVERLAY_MAX_SIDE = 2048

CAM_METHODS: tuple[str, ...] = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam",
                                "eigengradcam", "gradcamelementwise")
