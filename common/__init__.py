"""Leaf helpers that every layer may import: models, datasets, tasks and the engine.

Modules here import only torch, numpy and the standard library (never another AlignFuse package), so importing a
model or a dataset never loads the training engine.

- `common.dist`: process-group setup and collectives that are no-ops in a single process;
- `common.checkpoint_file`: `load_checkpoint_file`, torch.load(weights_only=True) with clear refusals.
"""
