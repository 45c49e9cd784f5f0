"""MiDaS monocular depth estimation (Ranftl et al. 2020, "Towards Robust Monocular Depth Estimation: Mixing Datasets
for Zero-shot Cross-dataset Transfer"; Ranftl et al. 2021, "Vision Transformers for Dense Prediction"), the depth
stage of Stable Diffusion 2's depth-to-image model, at the original module paths and with the state_dict keys of the
published MiDaS checkpoints (`dpt_hybrid-midas-501f0c75.pt`, `dpt_large-midas-2f21e586.pt`, `midas_v21-f6b98070.pt`,
`midas_v21_small-70d6b9c8.pt`).

- `ldm.modules.midas.api`: `MiDaSInference(model_type)` (frozen, eval), `load_model`, `load_midas_transform`;
- `ldm.modules.midas.midas.dpt_depth.DPTDepthModel`: DPT-Hybrid (ViT-B/16 on a ResNet-50 stem) and DPT-Large
  (ViT-L/16), both at 384x384;
- `ldm.modules.midas.midas.midas_net.MidasNet` (ResNeXt-101 32x8d encoder) and
  `ldm.modules.midas.midas.midas_net_custom.MidasNet_small` (EfficientNet-Lite3 encoder);
- `ldm.modules.midas.midas.transforms`: the input transforms (`Resize`, `NormalizeImage`, `PrepareForNet`).

The backbones are built by timm (ViTs, EfficientNet) and torchvision (ResNeXt) without pretrained weights; the
weights come from a local MiDaS file or from a full depth-to-image checkpoint (`depth_model.model.*`).
"""
