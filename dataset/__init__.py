"""Datasets, transforms and loaders for the ALBEF annotation formats.

Modules: ``annotations`` (JSON loading + validation), ``text`` (caption/question cleaning), ``transforms`` (OpenCV
decode, crops, device-side normalisation), ``randaugment`` (RandAugment on uint8 arrays), ``datasets`` (one class and
one collator per format), ``loader`` (DataLoader factory), ``sampler`` (resumable distributed sampler),
``tokenizer`` and ``synthetic`` (demo data). Import the module you need; nothing is re-exported here so that importing
one piece (e.g. the tokenizer) does not pull in OpenCV.
"""
