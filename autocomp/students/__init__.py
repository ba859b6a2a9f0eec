"""Students: smaller architectures pruned from the teacher (depth, FFN width, heads) and recovered by
knowledge distillation. ``spec`` (what), ``prune`` (structured pruning into a real smaller model),
``distill`` (the training loop), ``build`` (prune + distill + on-disk cache), ``cost`` (cost-aware
sampling of distillation budgets)."""
