"""bsr_device: train `bsr export --format ort-training` artifacts on a device, without PyTorch.

The on-device half of BSR (Sarkar et al., arXiv 2405.10951; SPEC section 10). A phone or board trains with ONNX
Runtime's on-device training API, not PyTorch; this package is the reference trainer of the artifacts `bsr` exports
for it, and imports only onnxruntime-training, numpy and Pillow. It is a package of its own because `import bsr`
loads PyTorch. `bsr` itself imports from it (the error type, the learning-rate schedule, the artifact format), never
the other way round.

    python -m bsr_device train ARTIFACTS --dataset folder:PATH --out DEVICE_RUN
"""
