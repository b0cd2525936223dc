"""
What slim.py (Tang et al., "Patch Slimming for Efficient Vision Transformers", CVPR 2022, arXiv 2106.02852) needs
beside the method itself: running on several processes (distributed.py), evaluation (evaluate.py), the final
end-to-end fine-tune with DeiT's recipe (finetune.py, method.md C7), the ONNX export (export.py) and the dynamic
variant DPS-ViT, made from a static run (dynamic.py, method.md P6, C8).
"""
