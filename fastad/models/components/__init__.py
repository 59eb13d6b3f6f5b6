"""Building blocks the models share (no model imports another model's module):

- :mod:`.maps`: map upsampling, smoothing, image scores;
- :mod:`.memory_bank`: PatchCore's patch embedding and memory bank;
- :mod:`.gaussian`: PaDiM's per-position Gaussians;
- :mod:`.tokens`: the token-reconstruction blocks of FOD and RLR;
- :mod:`.residual`: ADPretrain's residual features and Feature Projectors;
- :mod:`.batch_norm`: BatchNorm statistics over the global batch of a data-parallel fit;
- :mod:`.vit_encoder`, :mod:`.unireplknet`: the frozen encoders of Dinomaly and MiniMaxAD;
- :mod:`.authors`: reading the weight files the methods' authors release, renamed to fastad's modules.
"""
