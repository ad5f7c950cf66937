"""What a sample becomes: the augmentation recipe (docs/spec.md sections 7 and 9), its random draws, and the same
views on PIL images, as batched tensor ops and as DALI graphs; erasing, normalization and the host-to-device upload."""
